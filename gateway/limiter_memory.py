"""``InProcessLimiter``: the Redis limiter's semantics in one process (embedded mode).

Every check runs without an ``await`` between reading and writing the counters, so it is
atomic on the event loop; a lock also covers callers from other threads. The algorithm
is the one in ``limiter_redis.ADMIT_LUA``, step for step; the same tests run on both.

The synchronous core (``decide``, ``settle_now``, ``raise_months``) is also what the
limits broker (``gateway.limits_broker``) serves to the gateway workers of one supervisor;
``decide`` counts no metrics, so each worker counts its own rejections.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from loraplex.gateway.limits import (
    WINDOW_MS,
    Admission,
    LimitKind,
    MonthUsage,
    Scope,
    Verdict,
    Violation,
    Window,
    month_key,
    ms_to_next_month,
    new_admission_id,
    ratelimit_headers,
    rejection,
    reserve_spend,
    scopes_for,
    settled_spend,
)
from loraplex.gateway.metrics import Metrics
from loraplex.tenancy.principal import Principal


@dataclass
class _ScopeState:
    window: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)  # id->(t, tok)
    window_tokens: int = 0
    inflight: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # id->(exp, tok, $)
    reserved_tokens: int = 0
    reserved_spend: int = 0
    months: dict[str, list[int]] = field(default_factory=dict)  # month -> [tokens, spend]

    def prune(self, now: int) -> None:
        while self.window:
            rid, (t, tok) = next(iter(self.window.items()))
            if t > now - WINDOW_MS:
                break
            del self.window[rid]
            self.window_tokens -= tok
        for rid in [r for r, (exp, _, _) in self.inflight.items() if exp <= now]:
            self._release(rid)

    def _release(self, rid: str) -> None:
        entry = self.inflight.pop(rid, None)
        if entry is not None:
            self.reserved_tokens -= entry[1]
            self.reserved_spend -= entry[2]

    def oldest_reset(self, now: int) -> int:
        if not self.window:
            return 0
        return next(iter(self.window.values()))[0] + WINDOW_MS - now

    def tokens_retry(self, now: int, limit: int, reserve: int) -> int:
        freed = 0
        for t, tok in self.window.values():
            freed += tok
            if self.window_tokens - freed + reserve <= limit:
                return t + WINDOW_MS - now
        return WINDOW_MS


class InProcessLimiter:
    def __init__(
        self,
        metrics: Metrics,
        *,
        lease_s: float = 600.0,
        clock_ms: Callable[[], int] | None = None,
        wall: Callable[[], datetime] | None = None,
    ) -> None:
        self._metrics = metrics
        self._lease_ms = int(lease_s * 1000)
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._wall = wall or (lambda: datetime.now(UTC))
        self._states: dict[str, _ScopeState] = {}
        self._lock = threading.Lock()

    def _state(self, scope: Scope) -> _ScopeState:
        state = self._states.get(scope.redis_base)  # (not setdefault: a new state each call)
        if state is None:
            state = self._states[scope.redis_base] = _ScopeState()
        return state

    async def admit(
        self, principal: Principal, reserve_tokens: int, *, prompt_tokens: int | None = None
    ) -> Admission:
        verdict, admission = self.decide(principal, reserve_tokens, prompt_tokens)
        if admission is None:
            for v in verdict.violations:
                self._metrics.limit_rejected(v.kind.value, v.scope, principal.tenant_name)
            raise rejection(verdict, reserve_tokens)
        return admission

    def decide(
        self,
        principal: Principal,
        reserve_tokens: int,
        prompt_tokens: int | None = None,
        admission_id: str | None = None,
    ) -> tuple[Verdict, Admission | None]:
        """One atomic check: the verdict, and the admission when granted (no metrics)."""
        scopes = scopes_for(principal)
        spend = reserve_spend(principal, reserve_tokens, prompt_tokens)
        rid = admission_id or new_admission_id()
        wall = self._wall()
        with self._lock:
            verdict = self._check(scopes, reserve_tokens, spend, wall, rid)
        if not verdict.admitted:
            return verdict, None
        return verdict, Admission(rid, scopes, reserve_tokens, spend, ratelimit_headers(verdict))

    def _check(
        self, scopes: tuple[Scope, ...], reserve: int, spend: int, wall: datetime, rid: str
    ) -> Verdict:
        now = self._clock_ms()
        month = month_key(wall)
        violations: list[Violation] = []
        for scope in scopes:
            st, lim = self._state(scope), scope.limits
            st.prune(now)
            for old in [m for m in st.months if m < month]:
                del st.months[old]
            used_month = st.months.get(month, [0, 0])
            if lim.requests_per_minute is not None:
                rpm = lim.requests_per_minute
                if len(st.window) + 1 > rpm:
                    retry = st.oldest_reset(now) if st.window else WINDOW_MS
                    violations.append(Violation(scope.name, LimitKind.REQUESTS, rpm, retry))
            if lim.tokens_per_minute is not None:
                tpm = lim.tokens_per_minute
                if reserve > tpm:
                    violations.append(Violation(scope.name, LimitKind.TOO_LARGE, tpm, WINDOW_MS))
                elif st.window_tokens + reserve > tpm:
                    retry = st.tokens_retry(now, tpm, reserve)
                    violations.append(Violation(scope.name, LimitKind.TOKENS, tpm, retry))
            if lim.max_concurrent is not None and len(st.inflight) + 1 > lim.max_concurrent:
                violations.append(
                    Violation(scope.name, LimitKind.CONCURRENCY, lim.max_concurrent, 1000)
                )
            budget = lim.monthly_token_budget
            if budget is not None and used_month[0] + st.reserved_tokens + reserve > budget:
                violations.append(
                    Violation(scope.name, LimitKind.TOKEN_BUDGET, budget, ms_to_next_month(wall))
                )
            budget = lim.monthly_spend_budget_micros
            if budget is not None and used_month[1] + st.reserved_spend + spend > budget:
                violations.append(
                    Violation(scope.name, LimitKind.SPEND_BUDGET, budget, ms_to_next_month(wall))
                )
        if not violations:
            for scope in scopes:
                st, lim = self._state(scope), scope.limits
                if lim.requests_per_minute is not None or lim.tokens_per_minute is not None:
                    st.window[rid] = (now, reserve)
                    st.window_tokens += reserve
                st.inflight[rid] = (now + self._lease_ms, reserve, spend)
                st.reserved_tokens += reserve
                st.reserved_spend += spend
        return Verdict(not violations, *self._windows(scopes, now), tuple(violations))

    def _windows(
        self, scopes: tuple[Scope, ...], now: int
    ) -> tuple[tuple[Window, ...], tuple[Window, ...]]:
        requests: list[Window] = []
        tokens: list[Window] = []
        for scope in scopes:
            st, lim = self._state(scope), scope.limits
            if lim.requests_per_minute is not None:
                requests.append(
                    Window(lim.requests_per_minute, len(st.window), st.oldest_reset(now))
                )
            if lim.tokens_per_minute is not None:
                tokens.append(Window(lim.tokens_per_minute, st.window_tokens, st.oldest_reset(now)))
        return tuple(requests), tuple(tokens)

    async def settle(
        self, admission: Admission, used_tokens: int, *, cost_micros: int | None = None
    ) -> None:
        if admission.settled:
            return
        admission.settled = True
        self.settle_now(admission, used_tokens, cost_micros)

    def settle_now(self, admission: Admission, used_tokens: int, cost_micros: int | None) -> None:
        """``settle`` without the once-only guard (the caller keeps it)."""
        spend = settled_spend(admission, used_tokens, cost_micros)
        month = month_key(self._wall())
        with self._lock:
            for scope in admission.scopes:
                st = self._state(scope)
                st._release(admission.id)
                entry = st.window.get(admission.id)
                if entry is not None:
                    st.window[admission.id] = (entry[0], used_tokens)
                    st.window_tokens += used_tokens - entry[1]
                counters = st.months.setdefault(month, [0, 0])
                counters[0] += used_tokens
                counters[1] += spend

    async def sync_month(self, usage: list[MonthUsage]) -> None:
        self.raise_months(usage)

    def raise_months(self, usage: list[MonthUsage]) -> None:
        with self._lock:
            for u in usage:
                counters = self._states.setdefault(u.redis_base, _ScopeState()).months
                current = counters.setdefault(u.month, [0, 0])
                current[0] = max(current[0], u.tokens)
                current[1] = max(current[1], u.spend_micros)

    async def aclose(self) -> None:
        return None
