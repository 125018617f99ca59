"""A circuit breaker for one dependency (the database, the object store).

Closed: calls go through; ``failure_threshold`` consecutive failures (errors or timeouts)
open it. Open: every call is refused at once with :class:`CircuitOpen` for ``open_s``
seconds, so an outage costs callers milliseconds instead of a timeout each. Then the
first call is let through as the probe (half-open) while the others are still refused:
its success closes the breaker, its failure opens it for another ``open_s``. A probe that
ends without a verdict (cancelled, or it never reached the dependency) is released and
the next call probes; one that never reports at all is replaced after ``open_s``.

Pure policy over a clock: no I/O, no asyncio, safe from any thread (the object store is
called from worker threads). Counters are read by the Prometheus collector at scrape time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]
STATE_VALUES: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}


class CircuitOpen(Exception):
    """The breaker refused the call; the dependency is presumed down for ``retry_after`` s."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"{name} unavailable (circuit open); retry in {retry_after:.1f}s")
        self.name = name
        self.retry_after = retry_after


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 3,
        open_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or open_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and open_s > 0")
        self.name = name
        self._threshold = failure_threshold
        self._open_s = open_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._failures = 0  # consecutive, while closed
        self._until = 0.0  # open: refuse until; half-open: the probe's deadline
        self.opened_total = 0  # times it opened
        self.rejected_total = 0  # calls refused while open

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._state == "open" and self._clock() >= self._until:
                return "half_open"  # the next call probes
            return self._state

    def retry_after(self) -> float:
        """Seconds until the next probe may run (at least a short pause when closed)."""
        with self._lock:
            left = self._until - self._clock() if self._state != "closed" else 0.0
        return max(left, min(1.0, self._open_s))

    def before_call(self) -> bool:
        """Admit a call or raise :class:`CircuitOpen`. True: this call is the probe (report
        its outcome with ``record_success``/``record_failure``, or ``release_probe``)."""
        with self._lock:
            if self._state == "closed":
                return False
            now = self._clock()
            if now < self._until:
                self.rejected_total += 1
                raise CircuitOpen(self.name, self._until - now)
            self._state = "half_open"
            self._until = now + self._open_s  # the probe's deadline
            return True

    def record_success(self) -> None:
        with self._lock:
            self._state, self._failures, self._until = "closed", 0, 0.0

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == "closed" and self._failures < self._threshold:
                return
            if self._state != "open":
                self.opened_total += 1
            self._state, self._failures = "open", 0
            self._until = self._clock() + self._open_s

    def release_probe(self) -> None:
        """The probe ended without a verdict: let the next call probe at once."""
        with self._lock:
            if self._state == "half_open":
                self._until = self._clock()
