"""Prometheus metrics, on a ``CollectorRegistry`` the lifespan builds (never the default one).

Label sets are bounded: route templates, status codes, limit kinds. Tenant labels only
when ``metrics_tenant_labels`` is on (cardinality grows with the number of tenants).
Engine gauges are read from the engine's stats at scrape time, not pushed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from loraplex.engine.client import EngineClient
from loraplex.engine.stats import EngineStats
from loraplex.tenancy.usage import UsageEvent

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


StatsSource = Callable[[], EngineStats | None]

_ENGINE_GAUGES: tuple[tuple[str, str, Callable[[EngineStats], float]], ...] = (
    ("requests_waiting", "Sequences queued in the engine", lambda s: s.num_waiting),
    ("requests_running", "Sequences in the running batch", lambda s: s.num_running),
    ("kv_blocks_used", "Paged KV cache blocks in use", lambda s: s.kv_blocks_used),
    ("kv_blocks_total", "Paged KV cache blocks in all", lambda s: s.kv_blocks_total),
    ("kv_usage_ratio", "Share of KV cache blocks in use", lambda s: s.kv_usage),
    ("batch_size", "Sequences in the last engine step", lambda s: s.last_batch_seqs),
    ("batch_tokens", "Tokens in the last engine step", lambda s: s.last_batch_tokens),
    ("adapters_resident", "LoRA adapters in GPU slots", lambda s: s.adapters_resident),
    ("adapters_loading", "LoRA adapters being fetched or read", lambda s: s.adapters_loading),
    ("adapter_slots", "LoRA GPU slots in all", lambda s: s.lora_slots),
    ("adapters_host", "LoRA adapters loaded in host memory", lambda s: s.adapters_host),
    (
        "adapters_host_bytes",
        "Bytes of LoRA adapter weights in host memory",
        lambda s: s.adapters_host_bytes,
    ),
    (
        "adapters_host_capacity_bytes",
        "The host tier's bound in bytes",
        lambda s: s.adapters_host_capacity_bytes,
    ),
)
_ENGINE_COUNTERS: tuple[tuple[str, str, Callable[[EngineStats], float]], ...] = (
    ("steps", "Engine steps run", lambda s: s.steps),
    ("preemptions", "Sequences preempted for KV space", lambda s: s.preemptions),
    (
        "prefix_cache_hit_tokens",
        "Prompt tokens served from the prefix cache",
        lambda s: s.prefix_cache_hit_tokens,
    ),
    (
        "adapter_cache_hits",
        "Requests whose adapter was already in a GPU slot",
        lambda s: s.adapter_hits,
    ),
    ("adapter_cache_misses", "Requests whose adapter had to be loaded", lambda s: s.adapter_misses),
    ("adapter_loads", "Adapter loads completed", lambda s: s.adapter_loads),
    ("adapter_load_failures", "Adapter loads failed", lambda s: s.adapter_load_failures),
    ("adapter_evictions", "Adapters evicted from GPU slots", lambda s: s.adapter_evictions),
    (
        "adapter_host_evictions",
        "Adapters evicted from host memory",
        lambda s: s.adapter_host_evictions,
    ),
    (
        "adapter_gpu_writes",
        "Adapters written from host into a GPU slot",
        lambda s: s.adapter_gpu_writes,
    ),
    (
        "adapter_gpu_write_bytes",
        "Bytes of adapter weights written from host into GPU slots",
        lambda s: s.adapter_gpu_write_bytes,
    ),
)


def _load_families(stats: EngineStats) -> Iterable[Metric]:
    """Adapter loads into host memory by the tier they came from (``disk``,
    ``object_store``): latency from asked for to ready, its parts, loads and bytes (rate()
    of these gives loads/s and bytes/s)."""
    by_tier = stats.adapter_loads_by_tier
    hist = HistogramMetricFamily(
        "loraplex_engine_adapter_load_seconds",
        "Adapter load latency into host memory (request queued to weights ready), by source",
        labels=["source"],
    )
    nbytes = CounterMetricFamily(
        "loraplex_engine_adapter_load_bytes",
        "Bytes of host adapter weights loaded, by source",
        labels=["source"],
    )
    phases = CounterMetricFamily(
        "loraplex_engine_adapter_load_phase_seconds",
        "Adapter load time by source and phase (queue, fetch, read)",
        labels=["source", "phase"],
    )
    for tier, t in sorted(by_tier.items()):
        buckets = [(repr(edge), float(n)) for edge, n in t.buckets] + [("+Inf", float(t.count))]
        hist.add_metric([tier], buckets, t.seconds)
        nbytes.add_metric([tier], float(t.bytes))
        for phase, v in (
            ("queue", t.queue_seconds),
            ("fetch", t.fetch_seconds),
            ("read", t.read_seconds),
        ):
            phases.add_metric([tier, phase], v)
    return (hist, nbytes, phases)


def _fairness_families(stats: EngineStats) -> tuple[Metric, ...]:
    """Service per fairness key (the tenant; at most 64 keys, then ``other``)."""
    service = CounterMetricFamily(
        "loraplex_engine_fair_service_tokens",
        "Tokens computed per fairness key and kind (prefill, decode)",
        labels=["fairness_key", "kind"],
    )
    queue = CounterMetricFamily(
        "loraplex_engine_fair_queue_seconds",
        "Seconds sequences waited before first scheduled, per fairness key",
        labels=["fairness_key"],
    )
    queue_steps = CounterMetricFamily(
        "loraplex_engine_fair_queue_steps",
        "Scheduler steps until sequences were first scheduled (1: at the first step after "
        "they arrived), summed per fairness key",
        labels=["fairness_key"],
    )
    scheduled = CounterMetricFamily(
        "loraplex_engine_fair_scheduled",
        "Sequences scheduled for the first time, per fairness key",
        labels=["fairness_key"],
    )
    preempted = CounterMetricFamily(
        "loraplex_engine_fair_preemptions",
        "Sequences preempted, per fairness key",
        labels=["fairness_key"],
    )
    first = CounterMetricFamily(
        "loraplex_engine_fair_first_token_seconds",
        "Seconds from a request's arrival in the engine to its first token, summed per "
        "fairness key",
        labels=["fairness_key"],
    )
    first_steps = CounterMetricFamily(
        "loraplex_engine_fair_first_token_steps",
        "Scheduler steps from a request's arrival in the engine to its first token on the "
        "host, summed per fairness key",
        labels=["fairness_key"],
    )
    firsts = CounterMetricFamily(
        "loraplex_engine_fair_first_tokens",
        "Requests that had their first token, per fairness key",
        labels=["fairness_key"],
    )
    for key, f in sorted(stats.fairness.items()):
        label = key or "none"
        service.add_metric([label, "prefill"], float(f.prefill_tokens))
        service.add_metric([label, "decode"], float(f.decode_tokens))
        queue.add_metric([label], f.queue_seconds)
        queue_steps.add_metric([label], float(f.queue_steps))
        scheduled.add_metric([label], float(f.scheduled))
        preempted.add_metric([label], float(f.preemptions))
        first.add_metric([label], f.first_token_seconds)
        first_steps.add_metric([label], float(f.first_token_steps))
        firsts.add_metric([label], float(f.first_tokens))
    return (service, queue, queue_steps, scheduled, preempted, first, first_steps, firsts)


class EngineCollector(Collector):
    """Reads ``engine.stats()`` at scrape time (a cheap snapshot, any thread)."""

    def __init__(self, source: StatsSource) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return []  # values exist only at scrape time

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self._source()
        except Exception:  # a scrape must never fail because the engine is starting
            stats = None
        if stats is None:
            return
        for name, doc, read in _ENGINE_GAUGES:
            yield GaugeMetricFamily(f"loraplex_engine_{name}", doc, value=float(read(stats)))
        for name, doc, read in _ENGINE_COUNTERS:
            yield CounterMetricFamily(f"loraplex_engine_{name}", doc, value=float(read(stats)))
        yield from _load_families(stats)
        yield from _fairness_families(stats)


def engine_stats_of(engine: Callable[[], EngineClient | None]) -> StatsSource:
    """A stats source over ``services.engine`` as it is at scrape time (None while loading)."""

    def read() -> EngineStats | None:
        current = engine()
        return None if current is None else current.stats()

    return read


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        tenant_labels: bool = False,
        engine_stats: StatsSource | None = None,
    ) -> None:
        self.registry = registry
        self.tenant_labels = tenant_labels
        t = ("tenant",) if tenant_labels else ()
        # labelled children per label values (``labels()`` costs ~10 us a call)
        self._http_children: dict[tuple[str, str, int], Counter] = {}
        self._usage_children: dict[tuple[str, ...], tuple[Counter, Counter, Counter, Counter]] = {}
        self.http_requests = Counter(
            "loraplex_http_requests",
            "HTTP responses by route template, method and status code",
            ("route", "method", "status"),
            registry=registry,
        )
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Time from admission to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "loraplex_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request",
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "loraplex_e2e_request_latency_seconds",
            "Time from admission to the last token (or the cut-off)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter("loraplex_tokens", "Metered tokens", ("kind", *t), registry=registry)
        self.metered = Counter(
            "loraplex_metered_requests",
            "Requests metered, by how they ended (ok, aborted, error)",
            ("status", *t),
            registry=registry,
        )
        self.limit_rejections = Counter(
            "loraplex_limit_rejections",
            "Requests refused by a rate limit or budget",
            ("limit", "scope", *t),
            registry=registry,
        )
        self.limiter_unavailable = Counter(
            "loraplex_limiter_unavailable",
            "Checks made while the limit store was unreachable, by policy outcome",
            ("check", "outcome"),
            registry=registry,
        )
        self.limiter_settle_errors = Counter(
            "loraplex_limiter_settle_errors",
            "Settlements lost because the limit store was unreachable",
            registry=registry,
        )
        self.ledger_lag = Gauge(
            "loraplex_ledger_lag_seconds",
            "Age of the oldest usage record not yet committed to the database",
            registry=registry,
        )
        self.ledger_pending = Gauge(
            "loraplex_ledger_pending_records",
            "Usage records in the outbox, not yet committed to the database",
            registry=registry,
        )
        self.ledger_dead = Gauge(
            "loraplex_ledger_dead_letters",
            "Usage records the database refused for their data, kept aside in the outbox",
            registry=registry,
        )
        self.ledger_written = Counter(
            "loraplex_ledger_records_written",
            "Usage records committed to the database (redeliveries excluded)",
            registry=registry,
        )
        self.ledger_errors = Counter(
            "loraplex_ledger_write_errors",
            "Failed attempts to commit outbox records to the database",
            registry=registry,
        )
        self.leader = Gauge(
            "loraplex_background_jobs_leader",
            "1 in the one process of a data dir that runs the ledger writer, budget sync "
            "and usage export (gateway.leader)",
            registry=registry,
        )
        self.usage_exports = Counter(
            "loraplex_usage_exports",
            "Daily usage exports, by outcome",
            ("outcome",),
            registry=registry,
        )
        if engine_stats is not None:
            registry.register(EngineCollector(engine_stats))

    def _t(self, tenant: str) -> tuple[str, ...]:
        return (tenant,) if self.tenant_labels else ()

    def observe_http(self, route: str, method: str, status: int) -> None:
        key = (route, method, status)
        child = self._http_children.get(key)
        if child is None:
            child = self._http_children[key] = self.http_requests.labels(route, method, str(status))
        child.inc()

    def observe_usage(self, event: UsageEvent, tenant: str = "") -> None:
        """Latency and token metrics from one metered request (called by the ledger)."""
        t = self._t(tenant or str(event.tenant_id))
        key = (event.status, *t)
        children = self._usage_children.get(key)
        if children is None:
            children = self._usage_children[key] = (
                self.metered.labels(event.status, *t),
                self.tokens.labels("prompt", *t),
                self.tokens.labels("completion", *t),
                self.tokens.labels("cached", *t),
            )
        metered, prompt, completion, cached = children
        metered.inc()
        prompt.inc(event.prompt_tokens)
        completion.inc(event.completion_tokens)
        cached.inc(event.cached_tokens)
        self.e2e.observe(event.duration_ms / 1000)
        if event.ttft_ms is not None:
            self.ttft.observe(event.ttft_ms / 1000)
            if event.completion_tokens > 1 and event.duration_ms >= event.ttft_ms:
                gaps = event.completion_tokens - 1
                self.tpot.observe((event.duration_ms - event.ttft_ms) / 1000 / gaps)

    def limit_rejected(self, limit: str, scope: str, tenant: str = "") -> None:
        self.limit_rejections.labels(limit, scope, *self._t(tenant)).inc()
