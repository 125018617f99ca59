"""Adapter services for the app: built from settings, validating against the engine's model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.adapters.service import AdapterServices, build_adapter_services, s3_options
from loraplex.adapters.spec import BaseModelSpec
from loraplex.adapters.upload import UploadLimits
from loraplex.engine.client import EngineClient
from loraplex.gateway.settings import GatewaySettings
from loraplex.tenancy.breaker import CircuitBreaker


def engine_adapter_spec(engine: EngineClient | None, name: str) -> BaseModelSpec | None:
    """The served base model's shape from the engine's model info; None until it is ready."""
    info = None if engine is None else engine.model_info()
    if info is None:
        return None
    c = info.adapter_shape
    return BaseModelSpec(
        name=name,
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        modules=tuple(c.modules),
        num_experts=c.num_experts,
        moe_intermediate_size=c.moe_intermediate_size,
    )


def model_dir_spec(model: str, name: str) -> BaseModelSpec | None:
    """From an HF model directory's ``config.json`` (control-plane pods run no engine)."""
    config = Path(model) / "config.json" if model else None
    if config is None or not config.is_file():
        return None
    try:
        return BaseModelSpec.from_hf_config(name, json.loads(config.read_text()))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None  # not a model the engine can load: the engine says so (serve exits 2)


def build_for_app(
    settings: GatewaySettings,
    sessions: async_sessionmaker[AsyncSession],
    engine: Callable[[], EngineClient | None],
    store_breaker: CircuitBreaker | None = None,
) -> AdapterServices:
    """``engine`` is a zero-argument callable returning the current engine (or None)."""
    name = settings.base_model_name()
    from_dir = model_dir_spec(settings.model, name)
    return build_adapter_services(
        sessions,
        store_url=settings.resolved_object_store_url(),
        s3_endpoint_url=settings.s3_endpoint_url,
        spec=lambda: engine_adapter_spec(engine(), name) or from_dir,
        limits=UploadLimits(
            max_rank=settings.max_lora_rank,
            max_body_bytes=settings.adapter_upload_max_bytes,
            max_expanded_bytes=2 * settings.adapter_upload_max_bytes,
        ),
        s3=s3_options(settings),
        store_breaker=store_breaker,
    )
