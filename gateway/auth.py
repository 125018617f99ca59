"""API key authentication: ``Authorization: Bearer lpx_<prefix>_<secret>``.

The key row is found by its public prefix and the secret checked against the stored keyed
hash in constant time on every request. Rows are cached in-process for ``ttl_s`` seconds
(negative answers too), so a revocation or suspension reaches every replica within that
time with no cross-replica messaging; expiry is checked against the clock on every request.
A key not in the cache is looked up once however many requests carry it at that moment:
they all wait for the one lookup (a burst on a freshly started worker would otherwise take
every pooled connection and time out with 503s). While the database is unavailable, a key
seen before keeps authenticating from its last known state for ``stale_s`` seconds past
its TTL (a revocation made elsewhere applies once the database answers again); any other
key gets the database's 503.
``last_used_at`` is collected in memory and written in one batched UPDATE per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.tenancy.api_keys import as_utc, find_by_prefix, record_last_used
from loraplex.tenancy.errors import DatabaseUnavailable, Forbidden, Unauthenticated
from loraplex.tenancy.keys import parse_key, verify
from loraplex.tenancy.limits import effective_tenant_limits
from loraplex.tenancy.models import ApiKey, Tenant, utcnow
from loraplex.tenancy.principal import Principal

log = logging.getLogger("loraplex.gateway.auth")


@dataclass(frozen=True)
class _KeyState:
    secret_hash: str
    expires_at: datetime | None
    revoked: bool
    tenant_active: bool
    principal: Principal


def _state(key: ApiKey, tenant: Tenant) -> _KeyState:
    plan = tenant.plan
    return _KeyState(
        secret_hash=key.secret_hash,
        expires_at=as_utc(key.expires_at),
        revoked=key.revoked_at is not None,
        tenant_active=tenant.status == "active",
        principal=Principal(
            tenant_id=tenant.id,
            tenant_name=tenant.name,
            key_id=key.id,
            scopes=frozenset(key.scopes),
            tenant_limits=effective_tenant_limits(plan.limits if plan else None, tenant.limits),
            key_limits=dict(key.limits),
            plan_name=plan.name if plan is not None else None,
            prompt_price_micros=plan.prompt_price_micros if plan is not None else 0,
            completion_price_micros=plan.completion_price_micros if plan is not None else 0,
        ),
    )


def _invalid(detail: str = "Incorrect API key provided.") -> Unauthenticated:
    return Unauthenticated(detail)


class KeyAuthenticator:
    """Turns a bearer token into a :class:`Principal`, or raises 401/403."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        secret_key: str,
        ttl_s: float,
        stale_s: float = 0.0,
        flush_interval_s: float = 10.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._secret_key = secret_key
        self._ttl_s = ttl_s
        self._stale_s = stale_s
        self._flush_interval_s = flush_interval_s
        self._max_entries = max_entries
        self._clock = clock
        self._cache: dict[str, tuple[float, _KeyState | None]] = {}
        self._loading: dict[str, asyncio.Future[_KeyState | None]] = {}  # lookups under way
        self._used: dict[uuid.UUID, datetime] = {}
        self._flusher: asyncio.Task[None] | None = None

    @property
    def secret_key(self) -> str:
        return self._secret_key

    async def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise _invalid(
                "You didn't provide an API key. Send it as `Authorization: Bearer lpx_...`."
            )
        parsed = parse_key(token)
        if parsed is None:
            raise _invalid()
        prefix, secret = parsed
        state = await self._lookup(prefix)
        if state is None or not verify(self._secret_key, secret, state.secret_hash):
            raise _invalid()
        if state.revoked:
            raise _invalid("This API key has been revoked.")
        if state.expires_at is not None and state.expires_at <= utcnow():
            raise _invalid("This API key has expired.")
        if not state.tenant_active:
            raise Forbidden("This tenant is suspended.", code="tenant_suspended")
        self._used[state.principal.key_id] = utcnow()  # type: ignore[index]
        return state.principal

    async def _lookup(self, prefix: str) -> _KeyState | None:
        hit = self._cache.get(prefix)
        if hit is not None and hit[0] > self._clock():
            return hit[1]
        loading = self._loading.get(prefix)
        if loading is None:
            loading = asyncio.ensure_future(self._load(prefix))
            self._loading[prefix] = loading
            loading.add_done_callback(lambda done: self._loaded(prefix, done))
        # shielded: a caller that goes away (a client disconnect) leaves it to the others
        return await asyncio.shield(loading)

    def _loaded(self, prefix: str, done: asyncio.Future[_KeyState | None]) -> None:
        if self._loading.get(prefix) is done:
            del self._loading[prefix]
        if not done.cancelled():
            done.exception()  # retrieved, even when every caller went away

    async def _load(self, prefix: str) -> _KeyState | None:
        now = self._clock()
        try:
            async with self._sessions() as session:
                found = await find_by_prefix(session, prefix)
        except DatabaseUnavailable:
            hit = self._cache.get(prefix)
            if hit is not None and hit[1] is not None and now < hit[0] + self._stale_s:
                return hit[1]  # last known good; never a stale "no such key"
            raise
        state = None if found is None else _state(*found)
        if len(self._cache) >= self._max_entries:
            self._cache.pop(next(iter(self._cache)))
        self._cache.pop(prefix, None)
        self._cache[prefix] = (now + self._ttl_s, state)
        return state

    def forget(self, prefix: str) -> None:
        """Drop one cached key (this replica sees a revocation it made at once)."""
        self._cache.pop(prefix, None)
        self._loading.pop(prefix, None)  # a lookup under way may predate the change

    def forget_tenant(self, tenant_id: uuid.UUID) -> None:
        """Drop every cached key of a tenant (its status or limits changed here)."""
        stale = [
            prefix
            for prefix, (_, state) in self._cache.items()
            if state is not None and state.principal.tenant_id == tenant_id
        ]
        for prefix in stale:
            self._cache.pop(prefix, None)
        self._loading.clear()  # lookups under way may predate the change

    async def flush(self) -> None:
        """Write the collected ``last_used_at`` values in one statement."""
        if not self._used:
            return
        used, self._used = self._used, {}
        async with self._sessions() as session:
            await record_last_used(session, used)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval_s)
            try:
                await self.flush()
            except DatabaseUnavailable as exc:  # an outage: the breaker logs no traceback
                log.warning("could not record last_used_at: %s", exc.message)
            except Exception:  # a database blip must not kill the flusher
                log.exception("could not record last_used_at")

    def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever(), name="key-last-used")

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        try:
            await self.flush()
        except Exception:
            log.exception("could not record last_used_at at shutdown")
