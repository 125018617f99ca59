"""The limits broker away, mute, busy or restarted, under real ZeroMQ sockets: the workers'
clients apply the outage policy (rates open, budgets closed) quickly, release what a late
answer granted, and check limits again once the broker is back."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import zmq
from limits_helpers import broker_address, new_metrics, principal

from loraplex.gateway.limiter_broker import BrokerLimiter
from loraplex.gateway.limits import MonthUsage
from loraplex.gateway.limits_broker import LimitsBroker
from loraplex.tenancy.errors import RateLimited, Unavailable


def unavailable(limiter_metrics, check: str, outcome: str) -> float:  # type: ignore[no-untyped-def]
    value = limiter_metrics.registry.get_sample_value(
        "loraplex_limiter_unavailable_total", {"check": check, "outcome": outcome}
    )
    return value or 0.0


async def test_no_broker_rates_fail_open_budgets_fail_closed_fast():
    metrics = new_metrics()
    with broker_address() as nobody:
        lim = BrokerLimiter(nobody, metrics)
        try:
            slowest = 0.0
            for _ in range(10):
                t0 = time.monotonic()
                ok = await lim.admit(principal({"requests_per_minute": 1}), 10)
                assert ok.degraded and ok.headers == {}
                await lim.settle(ok, 10)  # nothing to settle, no error
                with pytest.raises(Unavailable) as err:
                    await lim.admit(principal({"monthly_token_budget": 1000}), 10)
                assert err.value.status == 503
                slowest = max(slowest, time.monotonic() - t0)
            assert slowest < 0.5  # a short connect grace, then the breaker: never the timeout
            assert unavailable(metrics, "rate", "admitted") == 10
            assert unavailable(metrics, "budget", "rejected") == 10
        finally:
            await lim.aclose()


async def test_a_mute_broker_times_out_then_the_breaker_answers_at_once():
    with broker_address() as address:
        ctx = zmq.Context()
        mute = ctx.socket(zmq.ROUTER)  # takes every message, answers none
        mute.bind(address)
        lim = BrokerLimiter(address, new_metrics(), timeout_s=0.2, retry_s=5)
        try:
            times = []
            for _ in range(5):
                t0 = time.monotonic()
                assert (await lim.admit(principal({"max_concurrent": 1}), 1)).degraded
                times.append(time.monotonic() - t0)
            assert all(0.15 < t < 0.5 for t in times[:3]), times  # three timeouts trip it
            assert all(t < 0.05 for t in times[3:]), times
        finally:
            await lim.aclose()
            mute.close(0)
            ctx.term()


async def test_a_grant_answered_too_late_is_released():
    """A busy broker answers an admit after the worker gave up on it: the worker's release
    follows the admit, so the slot it was granted does not stay taken for the lease."""
    with broker_address() as address:
        broker = LimitsBroker(address)
        broker.start()
        worker = BrokerLimiter(address, new_metrics(), timeout_s=0.05)
        other = BrokerLimiter(address, new_metrics())
        try:
            who = principal({"max_concurrent": 1})
            month = [MonthUsage(uuid.uuid4().hex, None, "209901", 1, 1) for _ in range(50_000)]
            # The broker takes a good part of a second over this; the admit, sent after it
            # on the same connection, is answered after it: too late.
            sync = asyncio.create_task(worker.sync_month(month))
            await asyncio.sleep(0)
            assert (await worker.admit(who, 1)).degraded
            await sync
            deadline = time.monotonic() + 2  # (its release is on its way; the lease is 600s)
            while True:
                try:
                    admitted = await other.admit(who, 1)
                    break
                except RateLimited:
                    assert time.monotonic() < deadline, "the late grant still holds its slot"
                    await asyncio.sleep(0.02)
            assert not admitted.degraded
            with pytest.raises(RateLimited, match="concurrent"):
                await other.admit(who, 1)
        finally:
            await worker.aclose()
            await other.aclose()
            broker.stop()


async def test_limits_apply_again_once_the_broker_is_back():
    with broker_address() as address:
        lim = BrokerLimiter(address, new_metrics(), retry_s=0.2)
        try:
            who = principal({"requests_per_minute": 1})
            assert (await lim.admit(who, 1)).degraded  # not there yet
            broker = LimitsBroker(address)
            broker.start()
            try:
                deadline = time.monotonic() + 5
                while (await lim.admit(who, 1)).degraded:  # reconnects within a retry
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                with pytest.raises(RateLimited):
                    await lim.admit(who, 1)
            finally:
                broker.stop()
        finally:
            await lim.aclose()
