"""``RedisLimiter``: one Lua script per check, so limits hold across gateway replicas.

When Redis cannot be reached the configured policy decides (``gateway.limit_store``): by
default request rates fail open and budgets fail closed (503), counted in
``loraplex_limiter_unavailable_total``; after a few consecutive failures Redis is not tried
again for ``retry_s``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis

from loraplex.gateway.limit_scripts import ADMIT_LUA, SETTLE_LUA, SYNC_MONTH_LUA
from loraplex.gateway.limit_store import Breaker, OutagePolicy
from loraplex.gateway.limits import (
    KIND_CODES,
    Admission,
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

log = logging.getLogger("loraplex.limits")

MONTH_TTL_MS = 40 * 24 * 3600 * 1000
MAX_CONNECTIONS = 32  # per limiter (one per gateway worker process)
STORE_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, TimeoutError)


def _keys(scopes: tuple[Scope, ...], month: str) -> list[str]:
    keys: list[str] = []
    for s in scopes:
        b = s.redis_base
        keys += [f"{b}:w", f"{b}:wt", f"{b}:f", f"{b}:fr", f"{b}:sum", f"{b}:m:{month}"]
    return keys


def _limit_args(scope: Scope) -> list[int]:
    lim = scope.limits
    values = (
        lim.requests_per_minute,
        lim.tokens_per_minute,
        lim.max_concurrent,
        lim.monthly_token_budget,
        lim.monthly_spend_budget_micros,
    )
    return [-1 if v is None else v for v in values]


def _verdict(reply: list[int], scopes: tuple[Scope, ...]) -> Verdict:
    admitted, nviol = int(reply[0]) == 1, int(reply[1])
    pos = 2
    violations = []
    for _ in range(nviol):
        i, kind, limit, retry = (int(x) for x in reply[pos : pos + 4])
        violations.append(Violation(scopes[i - 1].name, KIND_CODES[kind], limit, retry))
        pos += 4
    requests: list[Window] = []
    tokens: list[Window] = []
    for _ in scopes:
        rpm, count, tpm, wt, reset = (int(x) for x in reply[pos : pos + 5])
        pos += 5
        if rpm >= 0:
            requests.append(Window(rpm, count, reset))
        if tpm >= 0:
            tokens.append(Window(tpm, wt, reset))
    return Verdict(admitted, tuple(requests), tuple(tokens), tuple(violations))


class RedisLimiter:
    def __init__(
        self,
        redis: Redis,
        metrics: Metrics,
        *,
        lease_s: float = 600.0,
        rates_fail_open: bool = True,
        budgets_fail_open: bool = False,
        timeout_s: float = 1.0,
        retry_s: float = 1.0,
        owns_client: bool = True,
    ) -> None:
        self._redis = redis
        self._metrics = metrics
        self._lease_ms = int(lease_s * 1000)
        self._policy = OutagePolicy(rates_fail_open, budgets_fail_open)
        self._timeout_s = timeout_s
        self._breaker = Breaker("limit store (Redis)", retry_s=retry_s)
        self._owns_client = owns_client
        self._admit = redis.register_script(ADMIT_LUA)
        self._settle = redis.register_script(SETTLE_LUA)
        self._sync = redis.register_script(SYNC_MONTH_LUA)

    @classmethod
    def from_url(cls, url: str, metrics: Metrics, **kwargs: float | bool) -> RedisLimiter:
        timeout = float(kwargs.get("timeout_s", 1.0))
        # A bounded pool: a burst of admissions queues for MAX_CONNECTIONS sockets rather
        # than opening one per request in flight (each a new TCP connection, and a burst of
        # them can exhaust ephemeral ports or the server's clients).
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        return cls(Redis(connection_pool=pool), metrics, **kwargs)  # type: ignore[arg-type]

    async def _call(self, script: object, keys: list[str], args: list[int | str]) -> list[int]:
        self._breaker.check()
        try:
            async with asyncio.timeout(self._timeout_s * 2):
                reply = await script(keys=keys, args=args)  # type: ignore[operator]
        except STORE_ERRORS as exc:
            self._breaker.failed(exc)
            raise
        self._breaker.succeeded()
        return reply  # type: ignore[no-any-return]

    async def admit(
        self, principal: Principal, reserve_tokens: int, *, prompt_tokens: int | None = None
    ) -> Admission:
        scopes = scopes_for(principal)
        spend = reserve_spend(principal, reserve_tokens, prompt_tokens)
        rid = new_admission_id()
        now = datetime.now(UTC)
        args: list[int | str] = [
            rid,
            reserve_tokens,
            spend,
            self._lease_ms,
            ms_to_next_month(now),
            len(scopes),
        ]
        for s in scopes:
            args += _limit_args(s)
        try:
            reply = await self._call(self._admit, _keys(scopes, month_key(now)), args)
        except STORE_ERRORS:
            return self._policy.degraded(self._metrics, scopes, rid, reserve_tokens, spend)
        verdict = _verdict(reply, scopes)
        if not verdict.admitted:
            for v in verdict.violations:
                self._metrics.limit_rejected(v.kind.value, v.scope, principal.tenant_name)
            raise rejection(verdict, reserve_tokens)
        return Admission(rid, scopes, reserve_tokens, spend, ratelimit_headers(verdict))

    async def settle(
        self, admission: Admission, used_tokens: int, *, cost_micros: int | None = None
    ) -> None:
        if admission.settled:
            return
        admission.settled = True
        if admission.degraded:
            return
        spend = settled_spend(admission, used_tokens, cost_micros)
        scopes = admission.scopes
        keys = _keys(scopes, month_key(datetime.now(UTC)))
        args: list[int | str] = [admission.id, used_tokens, spend, len(scopes), MONTH_TTL_MS]
        try:
            await self._call(self._settle, keys, args)
        except STORE_ERRORS as exc:
            # The ledger still bills it; only the Redis budget counter misses this request
            # (and its concurrency slot frees itself when the lease ends).
            self._metrics.limiter_settle_errors.inc()
            log.debug("settle of %s lost (%s); its lease will expire", admission.id, exc)

    async def sync_month(self, usage: list[MonthUsage]) -> None:
        """One script call per tenant (its scopes share a hash slot), pipelined."""
        by_tenant: dict[str, list[MonthUsage]] = {}
        for u in usage:
            by_tenant.setdefault(u.tenant_id, []).append(u)
        async with self._redis.pipeline(transaction=False) as pipe:
            for group in by_tenant.values():
                keys = [f"{u.redis_base}:m:{u.month}" for u in group]
                args: list[int] = [MONTH_TTL_MS]
                for u in group:
                    args += [u.tokens, u.spend_micros]
                await self._sync(keys=keys, args=args, client=pipe)
            await pipe.execute()

    async def aclose(self) -> None:
        if self._owns_client:
            await self._redis.aclose(close_connection_pool=True)
