"""What the replica router reports: its own Prometheus families (in the gateway's
``/metrics`` through ``EngineClient.metrics_text``) and the replicas' stats summed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.engine.stats import AdapterTierLoads, EngineStats
from loraplex.gateway.routing import Choice

if TYPE_CHECKING:
    from loraplex.gateway.routed_client import Replica


class _ReplicaCollector(Collector):
    def __init__(self, replicas: Callable[[], Sequence[Replica]]) -> None:
        self._replicas = replicas

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "loraplex_route_replica_up",
            "1 while the engine replica takes requests (ready, not ejected)",
            labels=["replica"],
        )
        inflight = GaugeMetricFamily(
            "loraplex_route_replica_inflight",
            "Requests this gateway process has in flight on the engine replica",
            labels=["replica"],
        )
        now = time.monotonic()
        for r in self._replicas():
            up.add_metric([r.url], 1.0 if r.routable(now) else 0.0)
            inflight.add_metric([r.url], float(r.inflight))
        return (up, inflight)


class RouteMetrics:
    def __init__(self, replicas: Callable[[], Sequence[Replica]]) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "loraplex_route_decisions",
            "Requests routed, by outcome: resident (to a replica holding the adapter on "
            "GPU), home (its hash home), spill (past the load bound), base (no adapter)",
            ("outcome",),
            registry=self.registry,
        )
        self.retries = Counter(
            "loraplex_route_retries",
            "Requests tried again on another replica before their first output",
            registry=self.registry,
        )
        self.ejections = Counter(
            "loraplex_route_ejections",
            "Replicas left out of routing after failing a request",
            ("replica",),
            registry=self.registry,
        )
        self.max_load_ratio = Gauge(
            "loraplex_route_max_load_ratio",
            "The highest in-flight count a replica was given, over the load bound at that "
            "moment (<= 1: no replica was ever over the bound)",
            registry=self.registry,
        )
        self.registry.register(_ReplicaCollector(replicas))
        self._max_ratio = 0.0

    def load_ratio(self, ratio: float) -> None:
        if ratio > self._max_ratio:
            self._max_ratio = ratio
            self.max_load_ratio.set(ratio)

    def routed(self, choice: Choice) -> None:
        self.decisions.labels(choice.outcome).inc()

    def retried(self) -> None:
        self.retries.inc()

    def ejected(self, url: str) -> None:
        self.ejections.labels(url).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


def _sum_tiers(a: AdapterTierLoads, b: AdapterTierLoads) -> AdapterTierLoads:
    buckets = [(edge, n + m) for (edge, n), (_, m) in zip(a.buckets, b.buckets, strict=False)]
    return AdapterTierLoads(
        count=a.count + b.count,
        seconds=a.seconds + b.seconds,
        queue_seconds=a.queue_seconds + b.queue_seconds,
        fetch_seconds=a.fetch_seconds + b.fetch_seconds,
        read_seconds=a.read_seconds + b.read_seconds,
        bytes=a.bytes + b.bytes,
        buckets=buckets or a.buckets or b.buckets,
    )


def _sum_parts(a: Any, b: Any) -> Any:
    if isinstance(a, AdapterTierLoads):
        return _sum_tiers(a, b)
    fields = msgspec.structs.asdict(a)  # numbers only (FairKeyStats)
    return type(a)(**{f: v + getattr(b, f) for f, v in fields.items()})


def merge_stats(all_stats: Sequence[EngineStats]) -> EngineStats | None:
    """Numbers summed, adapter key lists joined, load tiers summed (None for none)."""
    if not all_stats:
        return None
    merged: dict[str, Any] = msgspec.structs.asdict(all_stats[0])
    for stats in all_stats[1:]:
        for name, value in msgspec.structs.asdict(stats).items():
            mine = merged[name]
            if isinstance(value, list):
                merged[name] = list(dict.fromkeys([*mine, *value]))
            elif isinstance(value, dict):  # by load tier, or by fairness key
                parts = dict(mine)
                for k, v in value.items():
                    parts[k] = _sum_parts(parts[k], v) if k in parts else v
                merged[name] = parts
            else:
                merged[name] = mine + value
    return EngineStats(**merged)
