"""Limiter fixtures: the Redis limiter (on its own connection pool) and the in-process one."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from limits_helpers import new_metrics

from gateway.limiter_memory import InProcessLimiter
from gateway.limiter_redis import RedisLimiter
from gateway.limits import Limiter
from gateway.metrics import Metrics


@pytest.fixture(scope="session")
def limits_redis_url(request: pytest.FixtureRequest) -> str:
    """The shared ``redis_url`` fixture when the suite has one, else the local server."""
    try:
        return str(request.getfixturevalue("redis_url"))
    except pytest.FixtureLookupError:
        return os.environ.get("LORAPLEX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


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
