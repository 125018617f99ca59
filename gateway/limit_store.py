"""What a limiter does when its shared store (Redis, or the limits broker of a supervisor's
gateway workers) cannot be reached: one policy and one breaker for both.

The policy: request rates fail open (the request goes through unchecked) and budgets fail
closed (503) by default, since a burst is cheaper than an unbounded bill; either way the
outcome is counted in ``loraplex_limiter_unavailable_total``. The breaker: after
``TRIP_AFTER`` consecutive failures the store is not tried again for ``retry_s``, so an
outage does not add a timeout to every request (while one slow call, say on a busy event
loop, does not stop the checks).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from loraplex.gateway.limits import Admission, Scope
from loraplex.gateway.metrics import Metrics
from loraplex.tenancy.errors import Unavailable

log = logging.getLogger("loraplex.limits")

TRIP_AFTER = 3  # consecutive store failures before the limiter stops trying for retry_s


class StoreDown(ConnectionError):
    """The store is marked down (or did not answer): the outage policy applies."""


class Breaker:
    def __init__(self, what: str, *, retry_s: float = 1.0) -> None:
        self._what = what
        self._retry_s = retry_s
        self._failures = 0
        self.down_until = 0.0  # monotonic time before which the store is not tried

    def check(self) -> None:
        if time.monotonic() < self.down_until:
            raise StoreDown(f"{self._what} marked down after repeated failures")

    def failed(self, exc: BaseException) -> None:
        self._failures += 1
        if self._failures >= TRIP_AFTER:
            log.warning(
                "%s unreachable (%s); policies apply for %.1fs", self._what, exc, self._retry_s
            )
            self.down_until = time.monotonic() + self._retry_s
            self._failures = 0

    def succeeded(self) -> None:
        self._failures = 0


@dataclass(frozen=True)
class OutagePolicy:
    rates_fail_open: bool = True
    budgets_fail_open: bool = False

    def degraded(
        self, metrics: Metrics, scopes: tuple[Scope, ...], rid: str, reserve: int, spend: int
    ) -> Admission:
        """The store is unreachable: each applicable check's policy decides (raises
        ``Unavailable`` for a check that fails closed)."""
        budgets = any(s.limits.has_budgets for s in scopes)
        rates = any(s.limits.has_rates for s in scopes)
        for check, applies, fail_open in (
            ("budget", budgets, self.budgets_fail_open),
            ("rate", rates, self.rates_fail_open),
        ):
            if not applies:
                continue
            if not fail_open:
                metrics.limiter_unavailable.labels(check, "rejected").inc()
                raise Unavailable(
                    f"usage limits cannot be checked right now ({check}); retry shortly"
                )
            metrics.limiter_unavailable.labels(check, "admitted").inc()
        return Admission(rid, scopes, reserve, spend, degraded=True)
