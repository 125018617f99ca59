"""Limiter fixtures: the Redis limiter (on its own connection pool), the in-process one, and
the broker client (each ``make_limiter("broker")`` is another worker's client of the one
limits broker of the test, a real ZeroMQ server on an ipc socket)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from limits_helpers import broker_address, new_metrics

from loraplex.gateway.limiter_broker import BrokerLimiter
from loraplex.gateway.limiter_memory import InProcessLimiter
from loraplex.gateway.limiter_redis import RedisLimiter
from loraplex.gateway.limits import Limiter
from loraplex.gateway.limits_broker import LimitsBroker
from loraplex.gateway.metrics import Metrics


@pytest.fixture
def limits_redis_url(redis_url: str) -> str:
    return redis_url


@pytest.fixture
def limits_broker() -> Iterator[LimitsBroker]:
    with broker_address() as address:
        broker = LimitsBroker(address)
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()


@pytest.fixture
async def make_limiter(
    request: pytest.FixtureRequest, limits_redis_url: str
) -> AsyncIterator[Callable[..., Limiter]]:
    """``make_limiter(kind, **options)``: a fresh limiter; each call opens its own client."""
    made: list[Limiter] = []

    def make(kind: str, metrics: Metrics | None = None, **options: Any) -> Limiter:
        m = metrics or new_metrics()
        lim: Limiter
        if kind == "redis":
            lim = RedisLimiter.from_url(limits_redis_url, m, **options)
        elif kind == "broker":
            broker: LimitsBroker = request.getfixturevalue("limits_broker")
            lim = BrokerLimiter(broker.address, m, **options)
        else:
            lim = InProcessLimiter(m, **options)
        made.append(lim)
        return lim

    yield make
    for lim in made:
        await lim.aclose()
