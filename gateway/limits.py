"""Admission control: the ``Limiter`` contract and the values that cross it.

The request path calls ``admit(principal, reserve_tokens)`` before it touches the engine
(prompt tokens plus ``max_tokens`` are reserved), and ``settle(admission, used_tokens)``
exactly once when the request ends, however it ends: the real count replaces the
reservation and the concurrency slot is released.

Two implementations share these semantics: ``RedisLimiter`` (one Lua script per check,
atomic across gateway replicas) and ``InProcessLimiter`` (embedded mode, no Redis).
Each checks a tenant scope (the plan's limits under the tenant's) and, when the key has
limits of its own, a key scope. Over a limit: ``RateLimited`` (429, code
``rate_limit_exceeded``) or, for a monthly budget, ``QuotaExceeded`` (``insufficient_quota``),
both with ``retry_after`` and the ``x-ratelimit-*`` headers, which also go on successes.

Windows slide: a request counts against ``requests_per_minute`` (and its tokens against
``tokens_per_minute``) for exactly 60 seconds after its admission. Budgets count settled
usage of the calendar month (UTC) plus the reservations of requests in flight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from typing import Literal, Protocol

from loraplex.tenancy.errors import QuotaExceeded, RateLimited
from loraplex.tenancy.limits import Limits
from loraplex.tenancy.principal import Principal
from loraplex.tenancy.usage import cost_micros

WINDOW_MS = 60_000


class LimitKind(StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    CONCURRENCY = "concurrency"
    TOKEN_BUDGET = "token_budget"
    SPEND_BUDGET = "spend_budget"
    TOO_LARGE = "request_too_large"  # the reservation alone exceeds tokens_per_minute


# The integer codes the Lua script returns, in the order checks run within a scope.
KIND_CODES: dict[int, LimitKind] = {i + 1: k for i, k in enumerate(LimitKind)}
BUDGET_KINDS = frozenset({LimitKind.TOKEN_BUDGET, LimitKind.SPEND_BUDGET})

ScopeName = Literal["tenant", "key"]


@dataclass(frozen=True)
class Scope:
    """One set of counters: the tenant's, or one API key's (keys live in their tenant's
    Redis hash slot, so one script can touch both)."""

    name: ScopeName
    tenant_id: str
    key_id: str | None
    limits: Limits

    @cached_property
    def redis_base(self) -> str:
        tail = "t" if self.name == "tenant" else f"k:{self.key_id}"
        return f"lp:lim:{{{self.tenant_id}}}:{tail}"


def scopes_for(principal: Principal) -> tuple[Scope, ...]:
    """The tenant scope always (its month usage is tracked even without a budget, so a
    budget set mid-month sees the month so far); the key scope when the key has limits."""
    tenant_id = principal.tenant_key
    tenant = Scope("tenant", tenant_id, None, principal.tenant_limits_parsed)
    key_limits = principal.key_limits_parsed
    if principal.key_id is None or key_limits.empty:
        return (tenant,)
    return tenant, Scope("key", tenant_id, str(principal.key_id), key_limits)


@dataclass(frozen=True)
class Window:
    """A per-minute window after a check: what the ``x-ratelimit-*`` headers report."""

    limit: int
    used: int
    reset_ms: int  # until the oldest counted request leaves the window

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(frozen=True)
class Violation:
    scope: ScopeName
    kind: LimitKind
    limit: int
    retry_ms: int


@dataclass(frozen=True)
class Verdict:
    """What one atomic check decided (built by either implementation)."""

    admitted: bool
    requests: tuple[Window, ...] = ()
    tokens: tuple[Window, ...] = ()
    violations: tuple[Violation, ...] = ()


@dataclass
class Admission:
    """A granted request; hand it back to ``settle`` exactly once."""

    id: str
    scopes: tuple[Scope, ...]
    reserved_tokens: int
    reserved_spend_micros: int
    headers: dict[str, str] = field(default_factory=dict)
    degraded: bool = False  # admitted without a check (the store was unreachable)
    settled: bool = False


@dataclass(frozen=True)
class MonthUsage:
    """One scope's usage this month as the ledger has it (``key_id`` None: the tenant)."""

    tenant_id: str
    key_id: str | None
    month: str  # YYYYMM
    tokens: int
    spend_micros: int

    @property
    def redis_base(self) -> str:
        return Scope(
            "key" if self.key_id else "tenant", self.tenant_id, self.key_id, Limits()
        ).redis_base


class Limiter(Protocol):
    async def admit(
        self, principal: Principal, reserve_tokens: int, *, prompt_tokens: int | None = None
    ) -> Admission: ...

    async def settle(
        self, admission: Admission, used_tokens: int, *, cost_micros: int | None = None
    ) -> None: ...

    async def sync_month(self, usage: list[MonthUsage]) -> None:
        """Raise the month counters to at least the ledger's (after a store restart lost
        them, or for usage settled elsewhere); never lowers them."""
        ...

    async def aclose(self) -> None: ...


def new_admission_id() -> str:
    # Never the client's x-request-id: a reused id must not merge two requests' counters.
    return os.urandom(16).hex()  # 128 random bits, as uuid4 (4x faster)


def reserve_spend(principal: Principal, reserve_tokens: int, prompt_tokens: int | None) -> int:
    """The most the request can cost: prompt at the prompt price, the rest at the
    completion price (all at the higher price when the split is unknown)."""
    p, c = principal.prompt_price_micros, principal.completion_price_micros
    if prompt_tokens is None:
        return cost_micros(0, reserve_tokens, 0, max(p, c))
    prompt = min(prompt_tokens, reserve_tokens)
    return cost_micros(prompt, reserve_tokens - prompt, p, c)


def settled_spend(admission: Admission, used_tokens: int, cost: int | None) -> int:
    if cost is not None:
        return cost
    if admission.reserved_tokens <= 0:
        return 0
    # No exact cost given: pro rata of the reservation (never more than reserved).
    used = min(used_tokens, admission.reserved_tokens)
    return admission.reserved_spend_micros * used // admission.reserved_tokens


def month_key(now: datetime) -> str:
    return f"{now.year:04d}{now.month:02d}"


def ms_to_next_month(now: datetime) -> int:
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    start = datetime(year, month, 1, tzinfo=UTC)
    return max(1, int((start - now).total_seconds() * 1000))


def format_reset(ms: int) -> str:
    """OpenAI's duration style: ``250ms``, ``12.5s``, ``6m0s``."""
    ms = max(0, int(ms))
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def _tightest(windows: tuple[Window, ...]) -> Window | None:
    return min(windows, key=lambda w: (w.remaining, -w.reset_ms), default=None)


def ratelimit_headers(verdict: Verdict) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, windows in (("requests", verdict.requests), ("tokens", verdict.tokens)):
        w = _tightest(windows)
        if w is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(w.limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(w.remaining)
            headers[f"x-ratelimit-reset-{name}"] = format_reset(w.reset_ms)
    return headers


_MESSAGES = {
    LimitKind.REQUESTS: "Rate limit reached for requests per minute",
    LimitKind.TOKENS: "Rate limit reached for tokens per minute",
    LimitKind.CONCURRENCY: "Too many concurrent requests",
    LimitKind.TOKEN_BUDGET: "Monthly token budget exhausted",
    LimitKind.SPEND_BUDGET: "Monthly spend budget exhausted",
    LimitKind.TOO_LARGE: "Request too large for the tokens per minute limit "
    "(prompt plus max_tokens); lower max_tokens",
}


def rejection(verdict: Verdict, reserve_tokens: int) -> RateLimited:
    """The error for a refused verdict: a quota error when any budget is exhausted."""
    budget = [v for v in verdict.violations if v.kind in BUDGET_KINDS]
    chosen = budget or list(verdict.violations)
    worst = max(chosen, key=lambda v: v.retry_ms)
    retry_s = max(worst.retry_ms, 1) / 1000
    detail = f" ({worst.scope} limit {worst.limit}"
    if worst.kind in (LimitKind.TOKENS, LimitKind.TOO_LARGE):
        detail += f", requested {reserve_tokens}"
    message = f"{_MESSAGES[worst.kind]}{detail}). Retry after {format_reset(worst.retry_ms)}."
    headers = ratelimit_headers(verdict)
    if budget:
        return QuotaExceeded(message, retry_after=retry_s, headers=headers)
    return RateLimited(message, retry_after=retry_s, headers=headers)
