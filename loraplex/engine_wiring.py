"""Composition of the engine side from settings: its config, its adapter fetcher, the
engine server, and the in-process client (the one place that joins ``engine`` and
``adapters``, which never import each other)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest

from loraplex.gateway.settings import GatewaySettings

log = logging.getLogger("loraplex.engine.start")

if TYPE_CHECKING:
    from loraplex.engine.api import AdapterRef
    from loraplex.engine.config import EngineConfig
    from loraplex.engine.inproc_client import InprocEngineClient
    from loraplex.engine.server import EngineServer


def engine_config(settings: GatewaySettings) -> EngineConfig:
    from loraplex.engine.config import EngineConfig

    return EngineConfig(
        device=settings.device,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        contended_prefill_tokens=settings.contended_prefill_tokens,
        max_loras=settings.max_loras,
        lora_memory_bytes=settings.lora_memory_bytes,
        lora_memory_fraction=settings.lora_memory_fraction,
        max_lora_rank=settings.max_lora_rank,
        host_lora_bytes=settings.host_lora_bytes,
        host_lora_memory_fraction=settings.host_lora_memory_fraction,
        adapter_load_workers=settings.adapter_load_workers,
        kv_cache_bytes=settings.kv_cache_bytes,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        async_scheduling=settings.async_scheduling,
        prefill_graph_tokens=settings.prefill_graph_tokens,
        quantization=settings.quantization,
        fp8_w8a8_min_tokens=settings.fp8_w8a8_min_tokens,
        kv_cache_dtype=settings.kv_cache_dtype,
        kernel_config_dir=settings.kernel_config_dir or settings.data_dir / "kernel-configs",
        kernel_tuning=settings.kernel_tuning,
        tensor_parallel_size=settings.tensor_parallel_size,
    )


def store_fetch(
    settings: GatewaySettings, registry: CollectorRegistry
) -> Callable[[AdapterRef], Path | tuple[Path, str]]:
    """``AdapterRef`` -> local PEFT directory: ``store:`` keys through the object store and
    the engine's disk cache; anything else is a local directory. Its metrics go into
    ``registry`` (the engine side's own)."""
    from loraplex.adapters.service import build_fetcher, s3_options
    from loraplex.engine.lora.loader import local_fetch
    from loraplex.tenancy.breaker import CircuitBreaker

    fetcher = build_fetcher(
        store_url=settings.resolved_object_store_url(),
        s3_endpoint_url=settings.s3_endpoint_url,
        cache_dir=settings.adapter_cache_dir or settings.data_dir / "adapter-cache",
        cache_bytes=settings.adapter_cache_bytes,
        max_bytes=2 * settings.adapter_upload_max_bytes,
        metrics_registry=registry,
        s3=s3_options(settings),
        store_breaker=CircuitBreaker(
            "object_store",  # the engine process's own: a store that is down fails fast
            failure_threshold=settings.breaker_failure_threshold,
            open_s=settings.breaker_open_s,
        ),
    )

    def fetch(ref: AdapterRef) -> Path | tuple[Path, str]:
        storage_key = ref.storage_key
        if storage_key is None:
            return local_fetch(ref)
        return fetcher.fetch_with_tier(ref.key, storage_key)  # the tier for load metrics

    return fetch


def inproc_engine(
    settings: GatewaySettings, model: str, config: EngineConfig | None = None
) -> InprocEngineClient:
    """The engine in a thread of this process (tests, tools). ``config`` overrides the one
    the settings make."""
    from loraplex.engine.inproc_client import InprocEngineClient

    registry = CollectorRegistry()
    return InprocEngineClient.from_model(
        model,
        config or engine_config(settings),
        name=settings.base_model_name(),
        fetch=store_fetch(settings, registry),
        metrics=lambda: generate_latest(registry),
    )


def engine_server(
    settings: GatewaySettings,
    model: str,
    address: str,
    *,
    config: EngineConfig | None = None,
    parent_pid: int | None = None,
    load_errors: list[BaseException] | None = None,
) -> EngineServer:
    """The engine server; an error building the engine (loading the model) is appended
    to ``load_errors`` as well."""
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.server import EngineServer

    registry = CollectorRegistry()
    config, fetch = config or engine_config(settings), store_fetch(settings, registry)

    def build() -> LLMEngine:
        device, dtype = config.resolved_device(), str(config.resolved_dtype()).split(".")[-1]
        log.info("loading the model %s on %s (%s)...", model, device, dtype)
        started = time.monotonic()
        try:
            engine = LLMEngine.from_model(model, config, fetch=fetch)
        except BaseException as exc:
            if load_errors is not None:
                load_errors.append(exc)
            raise
        log.info("model loaded in %.1f s; the engine is ready", time.monotonic() - started)
        return engine

    return EngineServer(
        build,
        address,
        name=settings.base_model_name(),
        model=model,
        token=settings.engine_token or "",
        parent_pid=parent_pid,
        metrics=lambda: generate_latest(registry),
        http=settings.engine_http,
        drain_grace_s=settings.engine_drain_grace_s,
    )
