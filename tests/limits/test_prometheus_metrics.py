"""Metrics: bounded labels by default, tenant labels when switched on, engine gauges read
from the engine's stats at scrape time (absent while there is no engine)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, generate_latest

from loraplex.engine.stats import EngineStats
from loraplex.gateway.metrics import Metrics
from loraplex.tenancy.usage import UsageEvent


def usage(tenant: uuid.UUID) -> UsageEvent:
    now = datetime.now(UTC)
    return UsageEvent(
        request_id="r1", tenant_id=tenant, api_key_id=None, adapter_version_id=None,
        model="base", prompt_tokens=10, completion_tokens=5, cached_tokens=2, status="ok",
        started_at=now, finished_at=now, ttft_ms=100, duration_ms=500, cost_micros=7,
    )  # fmt: skip


def test_usage_observations_and_tenant_labels() -> None:
    plain = Metrics(CollectorRegistry())
    plain.observe_usage(usage(uuid.uuid4()), "acme")
    get = plain.registry.get_sample_value
    assert get("loraplex_tokens_total", {"kind": "completion"}) == 5
    assert get("loraplex_time_to_first_token_seconds_sum") == 0.1
    assert get("loraplex_time_per_output_token_seconds_sum") == 0.1  # (500 - 100) / 4 gaps
    assert get("loraplex_e2e_request_latency_seconds_count") == 1
    assert b"acme" not in generate_latest(plain.registry)

    labelled = Metrics(CollectorRegistry(), tenant_labels=True)
    labelled.observe_usage(usage(uuid.uuid4()), "acme")
    labelled.limit_rejected("requests", "key", "acme")
    get = labelled.registry.get_sample_value
    assert get("loraplex_tokens_total", {"kind": "prompt", "tenant": "acme"}) == 10
    assert (
        get(
            "loraplex_limit_rejections_total",
            {"limit": "requests", "scope": "key", "tenant": "acme"},
        )
        == 1
    )


def test_engine_gauges_are_read_at_scrape_time() -> None:
    current: list[EngineStats | None] = [None]
    metrics = Metrics(CollectorRegistry(), engine_stats=lambda: current[0])
    assert b"loraplex_engine_" not in generate_latest(metrics.registry)
    current[0] = EngineStats(
        num_waiting=3, num_running=5, kv_blocks_total=100, kv_blocks_used=40,
        last_batch_seqs=5, adapters_resident=2, lora_slots=8, adapter_hits=9,
    )  # fmt: skip
    get = metrics.registry.get_sample_value
    assert get("loraplex_engine_requests_waiting") == 3
    assert get("loraplex_engine_requests_running") == 5
    assert get("loraplex_engine_kv_blocks_used") == 40
    assert get("loraplex_engine_kv_usage_ratio") == 0.4
    assert get("loraplex_engine_batch_size") == 5
    assert get("loraplex_engine_adapters_resident") == 2
    assert get("loraplex_engine_adapter_cache_hits_total") == 9


def test_engine_adapter_loads_by_source_tier() -> None:
    """Loads into host memory by the tier they came from: a histogram of latency, bytes and
    the queue/fetch/read split, each labelled by source; the host tier's bytes and bound."""
    from loraplex.engine.stats import AdapterTierLoads

    disk = AdapterTierLoads(
        count=3, seconds=0.06, queue_seconds=0.01, fetch_seconds=0.0, read_seconds=0.05,
        bytes=3 * 2**20, buckets=[(0.01, 1), (0.05, 3)],
    )  # fmt: skip
    store = AdapterTierLoads(count=1, seconds=0.4, fetch_seconds=0.3, read_seconds=0.1,
                             bytes=2**20, buckets=[(0.01, 0), (0.05, 0)])  # fmt: skip
    stats = EngineStats(
        adapters_host=4, adapters_host_bytes=4 * 2**20, adapters_host_capacity_bytes=2**30,
        adapter_loads_by_tier={"disk": disk, "object_store": store}, adapter_gpu_writes=2,
    )  # fmt: skip
    metrics = Metrics(CollectorRegistry(), engine_stats=lambda: stats)
    get = metrics.registry.get_sample_value
    name = "loraplex_engine_adapter_load_seconds"
    assert get(f"{name}_bucket", {"source": "disk", "le": "0.01"}) == 1
    assert get(f"{name}_bucket", {"source": "disk", "le": "+Inf"}) == 3
    assert get(f"{name}_count", {"source": "object_store"}) == 1
    assert get(f"{name}_sum", {"source": "object_store"}) == 0.4
    assert get("loraplex_engine_adapter_load_bytes_total", {"source": "disk"}) == 3 * 2**20
    phase = "loraplex_engine_adapter_load_phase_seconds_total"
    assert get(phase, {"source": "object_store", "phase": "fetch"}) == 0.3
    assert get("loraplex_engine_adapters_host_bytes") == 4 * 2**20
    assert get("loraplex_engine_adapters_host_capacity_bytes") == 2**30
    assert get("loraplex_engine_adapter_gpu_writes_total") == 2


def test_engine_service_per_fairness_key() -> None:
    from loraplex.engine.stats import FairKeyStats

    stats = EngineStats(
        fairness={
            "t1": FairKeyStats(prefill_tokens=300, decode_tokens=40, queue_seconds=0.5,
                               queue_steps=3, scheduled=4, preemptions=1,
                               first_token_seconds=1.25, first_token_steps=9, first_tokens=4),
            "": FairKeyStats(decode_tokens=2),
        }
    )  # fmt: skip
    get = Metrics(CollectorRegistry(), engine_stats=lambda: stats).registry.get_sample_value
    one = {"fairness_key": "t1"}
    assert get("loraplex_engine_fair_service_tokens_total", one | {"kind": "decode"}) == 40
    assert get("loraplex_engine_fair_queue_seconds_total", one) == 0.5
    assert get("loraplex_engine_fair_queue_steps_total", one) == 3
    assert get("loraplex_engine_fair_first_token_seconds_total", one) == 1.25
    assert get("loraplex_engine_fair_first_token_steps_total", one) == 9
    assert get("loraplex_engine_fair_first_tokens_total", one) == 4
    assert get("loraplex_engine_fair_first_tokens_total", {"fairness_key": "none"}) == 0
