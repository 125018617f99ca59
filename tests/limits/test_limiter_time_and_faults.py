"""Windows that slide, leases that expire, and what happens when Redis is unreachable."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from limits_helpers import new_metrics, principal

from loraplex.gateway.limiter_memory import InProcessLimiter
from loraplex.gateway.limiter_redis import RedisLimiter
from loraplex.gateway.limits import format_reset, ms_to_next_month
from loraplex.tenancy.errors import QuotaExceeded, RateLimited, Unavailable

UNREACHABLE = "redis://127.0.0.1:1/0"


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


async def test_window_slides_request_by_request():
    clock = Clock()
    lim = InProcessLimiter(new_metrics(), clock_ms=clock)
    who = principal({"requests_per_minute": 2, "tokens_per_minute": 100})
    await lim.admit(who, 10)
    clock.ms += 20_000
    await lim.admit(who, 10)
    with pytest.raises(RateLimited) as err:
        await lim.admit(who, 10)
    assert err.value.retry_after == 40.0  # the first admission leaves the window then
    clock.ms += 40_000 - 1
    with pytest.raises(RateLimited):
        await lim.admit(who, 10)
    clock.ms += 1
    ok = await lim.admit(who, 10)
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    assert ok.headers["x-ratelimit-remaining-tokens"] == "80"
    assert ok.headers["x-ratelimit-reset-requests"] == "20s"


async def test_token_retry_after_waits_for_enough_tokens_to_leave():
    clock = Clock()
    lim = InProcessLimiter(new_metrics(), clock_ms=clock)
    who = principal({"tokens_per_minute": 100})
    for _ in range(4):
        await lim.admit(who, 25)
        clock.ms += 5_000
    with pytest.raises(RateLimited) as err:
        await lim.admit(who, 50)  # two admissions must leave: the second at t0 + 5s + 60s
    assert err.value.retry_after == 45.0


async def test_in_process_lease_frees_a_slot_never_settled():
    clock = Clock()
    lim = InProcessLimiter(new_metrics(), clock_ms=clock, lease_s=30)
    who = principal({"max_concurrent": 1, "monthly_token_budget": 50})
    await lim.admit(who, 50)  # never settled: the gateway crashed
    with pytest.raises(RateLimited):
        await lim.admit(who, 1)
    clock.ms += 30_000
    await lim.admit(who, 50)  # the reservation went with the lease


async def test_redis_lease_frees_a_slot_never_settled(make_limiter):
    lim = make_limiter("redis", lease_s=0.3)
    who = principal({"max_concurrent": 1})
    await lim.admit(who, 1)
    with pytest.raises(RateLimited):
        await lim.admit(who, 1)
    await asyncio.sleep(0.4)
    await lim.admit(who, 1)


async def test_redis_retry_after_is_the_window(make_limiter):
    lim = make_limiter("redis")
    who = principal({"requests_per_minute": 1})
    await lim.admit(who, 1)
    with pytest.raises(RateLimited) as err:
        await lim.admit(who, 1)
    assert 59 < err.value.retry_after <= 60


async def test_unreachable_redis_rates_fail_open_budgets_fail_closed():
    metrics = new_metrics()
    lim = RedisLimiter.from_url(UNREACHABLE, metrics, timeout_s=0.2)
    try:
        ok = await lim.admit(principal({"requests_per_minute": 1}), 10)
        assert ok.degraded and ok.headers == {}
        await lim.settle(ok, 10)  # nothing to settle, no error
        with pytest.raises(Unavailable) as err:
            await lim.admit(principal({"monthly_token_budget": 1000}), 10)
        assert err.value.status == 503
        sample = metrics.registry.get_sample_value
        assert (
            sample("loraplex_limiter_unavailable_total", {"check": "rate", "outcome": "admitted"})
            == 1
        )
        assert (
            sample("loraplex_limiter_unavailable_total", {"check": "budget", "outcome": "rejected"})
            == 1
        )
    finally:
        await lim.aclose()


async def test_unreachable_redis_policies_are_configurable():
    metrics = new_metrics()
    lim = RedisLimiter.from_url(
        UNREACHABLE, metrics, timeout_s=0.2, rates_fail_open=False, budgets_fail_open=True
    )
    try:
        with pytest.raises(Unavailable):
            await lim.admit(principal({"max_concurrent": 4}), 10)
        ok = await lim.admit(principal({"monthly_spend_budget_micros": 5}), 10)
        assert ok.degraded
        # A tenant without limits is never refused, whatever the policy.
        assert (await lim.admit(principal(), 10)).degraded
    finally:
        await lim.aclose()


async def test_redis_down_then_back(make_limiter, limits_redis_url):
    """After an outage the limiter goes back to Redis once ``retry_s`` has passed."""
    metrics = new_metrics()
    lim = RedisLimiter.from_url(limits_redis_url, metrics, timeout_s=0.2, retry_s=0.2)
    try:
        lim._breaker.down_until = float("inf")  # as if the last call had failed
        assert (await lim.admit(principal({"requests_per_minute": 1}), 1)).degraded
        lim._breaker.down_until = 0.0
        who = principal({"requests_per_minute": 1})
        assert not (await lim.admit(who, 1)).degraded
        with pytest.raises(RateLimited):
            await lim.admit(who, 1)
    finally:
        await lim.aclose()


def test_reset_format_and_month_end():
    assert format_reset(250) == "250ms"
    assert format_reset(12_500) == "12.5s"
    assert format_reset(360_000) == "6m0s"
    assert format_reset(61_250) == "1m1.25s"
    assert ms_to_next_month(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)) == 1000


async def test_quota_is_reported_over_rates():
    lim = InProcessLimiter(new_metrics())
    who = principal({"requests_per_minute": 1, "monthly_token_budget": 5})
    await lim.admit(who, 5)
    with pytest.raises(QuotaExceeded) as err:
        await lim.admit(who, 1)
    assert err.value.retry_after > 60  # until the month ends, not the minute


async def test_only_consecutive_failures_mark_the_store_down():
    lim = RedisLimiter.from_url(UNREACHABLE, new_metrics(), timeout_s=0.2)
    try:
        for _ in range(2):
            await lim.admit(principal({"requests_per_minute": 5}), 1)
        assert lim._breaker.down_until == 0.0  # a slow or failed call or two: keep trying
        await lim.admit(principal({"requests_per_minute": 5}), 1)
        assert lim._breaker.down_until > 0.0
    finally:
        await lim.aclose()
