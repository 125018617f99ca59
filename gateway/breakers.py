"""The circuit breakers of the app's dependencies, built in its lifespan, and their metrics.

One breaker per dependency: ``database`` (every session, :mod:`tenancy.db_guard`) and
``object_store`` (every store call, :mod:`adapters.guarded_store`). Redis has its own
policy in the limiter (:mod:`gateway.limiter_redis`). ``/ready`` and ``/metrics`` report
their states; the metrics are read from the breakers at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.gateway.settings import GatewaySettings
from loraplex.tenancy.breaker import STATE_VALUES, BreakerState, CircuitBreaker


@dataclass(frozen=True)
class Breakers:
    database: CircuitBreaker
    object_store: CircuitBreaker

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Breakers:
        def make(name: str) -> CircuitBreaker:
            return CircuitBreaker(
                name,
                failure_threshold=settings.breaker_failure_threshold,
                open_s=settings.breaker_open_s,
            )

        return cls(database=make("database"), object_store=make("object_store"))

    def all(self) -> tuple[CircuitBreaker, ...]:
        return (self.database, self.object_store)

    def states(self) -> dict[str, BreakerState]:
        return {b.name: b.state for b in self.all()}


class BreakerCollector(Collector):
    def __init__(self, breakers: Breakers) -> None:
        self._breakers = breakers

    def describe(self) -> Iterable[Metric]:
        return []  # values exist only at scrape time

    def collect(self) -> Iterable[Metric]:
        state = GaugeMetricFamily(
            "loraplex_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            labels=["dependency"],
        )
        opened = CounterMetricFamily(
            "loraplex_breaker_opened",
            "Times the circuit breaker opened",
            labels=["dependency"],
        )
        rejected = CounterMetricFamily(
            "loraplex_breaker_rejected",
            "Calls refused at once while the circuit breaker was open",
            labels=["dependency"],
        )
        for b in self._breakers.all():
            state.add_metric([b.name], STATE_VALUES[b.state])
            opened.add_metric([b.name], b.opened_total)
            rejected.add_metric([b.name], b.rejected_total)
        yield from (state, opened, rejected)
