"""Limiter fixtures: the Redis limiter (on its own connection pool) and the in-process one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from limits_helpers import new_metrics

from gateway.limiter_memory import InProcessLimiter
from gateway.limiter_redis import RedisLimiter
from gateway.limits import Limiter
from gateway.metrics import Metrics


@pytest.fixture
def limits_redis_url(redis_url: str) -> str:
    return redis_url


@pytest.fixture
async def make_limiter(limits_redis_url: str) -> AsyncIterator[Callable[..., Limiter]]:
    """``make_limiter(kind, **options)``: a fresh limiter; each call opens its own client."""
    made: list[Limiter] = []

    def make(kind: str, metrics: Metrics | None = None, **options: Any) -> Limiter:
        m = metrics or new_metrics()
        lim: Limiter
        if kind == "redis":
            lim = RedisLimiter.from_url(limits_redis_url, m, **options)
        else:
            lim = InProcessLimiter(m, **options)
        made.append(lim)
        return lim

    yield make
    for lim in made:
        await lim.aclose()
