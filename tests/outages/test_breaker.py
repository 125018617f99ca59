"""The circuit breaker's policy, built from ints and a clock."""

from __future__ import annotations

import pytest

from loraplex.tenancy.breaker import CircuitBreaker, CircuitOpen


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, threshold: int = 3, open_s: float = 2.0) -> CircuitBreaker:
    return CircuitBreaker("db", failure_threshold=threshold, open_s=open_s, clock=clock)


def test_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(5):  # a success in between resets the count
        b.before_call()
        b.record_failure()
        b.before_call()
        b.record_failure()
        b.before_call()
        b.record_success()
    assert b.state == "closed" and b.opened_total == 0
    for _ in range(3):
        assert b.before_call() is False
        b.record_failure()
    assert b.state == "open" and b.opened_total == 1
    with pytest.raises(CircuitOpen) as refused:
        b.before_call()
    assert refused.value.retry_after == pytest.approx(2.0)
    assert b.rejected_total == 1


def test_one_probe_after_the_open_interval_then_closed() -> None:
    clock = Clock()
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.now += 1.5
    with pytest.raises(CircuitOpen) as refused:
        b.before_call()
    assert refused.value.retry_after == pytest.approx(0.5)
    clock.now += 0.5
    assert b.state == "half_open"
    assert b.before_call() is True  # the probe
    with pytest.raises(CircuitOpen):
        b.before_call()  # everyone else waits for its verdict
    b.record_success()
    assert b.state == "closed"
    assert b.before_call() is False


def test_failed_probe_opens_again() -> None:
    clock = Clock()
    b = breaker(clock, threshold=1, open_s=1.0)
    b.record_failure()
    clock.now += 1.0
    assert b.before_call() is True
    b.record_failure()
    assert b.state == "open" and b.opened_total == 2
    with pytest.raises(CircuitOpen) as refused:
        b.before_call()
    assert refused.value.retry_after == pytest.approx(1.0)


def test_released_or_lost_probe_lets_another_probe() -> None:
    clock = Clock()
    b = breaker(clock, threshold=1, open_s=1.0)
    b.record_failure()
    clock.now += 1.0
    assert b.before_call() is True
    b.release_probe()  # cancelled: no verdict
    assert b.before_call() is True  # the next call probes at once
    with pytest.raises(CircuitOpen):
        b.before_call()
    clock.now += 1.0  # that probe never reported: replaced after open_s
    assert b.before_call() is True


def test_retry_after_and_bad_arguments() -> None:
    clock = Clock()
    b = breaker(clock, threshold=1, open_s=5.0)
    assert b.retry_after() == 1.0  # closed: a short pause
    b.record_failure()
    clock.now += 1.0
    assert b.retry_after() == pytest.approx(4.0)
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker("x", open_s=0)
