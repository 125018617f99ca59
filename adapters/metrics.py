"""Adapter cache metrics, registered in the registry the app passes (never the global one).

``tier`` is ``object_store`` or ``disk`` here; the gateway may feed the engine's ``host`` and
``gpu`` tiers into the same families with :meth:`record_load` and :meth:`set_resident`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class AdapterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.loads = Counter(
            "loraplex_adapter_loads",
            "Adapter loads into a tier, by outcome (ok|error).",
            ["tier", "outcome"],
            registry=registry,
        )
        self.load_seconds = Histogram(
            "loraplex_adapter_load_seconds",
            "Time to bring an adapter into a tier.",
            ["tier"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.hits = Counter(
            "loraplex_adapter_cache_hits", "Adapter cache hits.", ["tier"], registry=registry
        )
        self.misses = Counter(
            "loraplex_adapter_cache_misses", "Adapter cache misses.", ["tier"], registry=registry
        )
        self.evictions = Counter(
            "loraplex_adapter_cache_evictions", "Adapters evicted.", ["tier"], registry=registry
        )
        self.resident = Gauge(
            "loraplex_adapter_resident", "Adapters resident in a tier.", ["tier"],
            registry=registry,
        )  # fmt: skip
        self.resident_bytes = Gauge(
            "loraplex_adapter_resident_bytes", "Bytes of adapters resident in a tier.", ["tier"],
            registry=registry,
        )  # fmt: skip

    def record_load(self, tier: str, seconds: float, *, ok: bool = True) -> None:
        self.loads.labels(tier, "ok" if ok else "error").inc()
        if ok:
            self.load_seconds.labels(tier).observe(seconds)

    def set_resident(self, tier: str, count: int, nbytes: int | None = None) -> None:
        self.resident.labels(tier).set(count)
        if nbytes is not None:
            self.resident_bytes.labels(tier).set(nbytes)
