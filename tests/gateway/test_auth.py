"""KeyAuthenticator against a real database: cache TTL (with a clock we move by hand),
revocation and expiry, scopes into the Principal, batched ``last_used_at`` writes, one
lookup for a burst of requests with a key not cached yet."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.gateway.auth import KeyAuthenticator
from loraplex.tenancy import api_keys, plans, tenants
from loraplex.tenancy.db import make_engine, make_sessionmaker
from loraplex.tenancy.errors import Forbidden, Unauthenticated
from loraplex.tenancy.models import ApiKey, utcnow

SECRET = secrets.token_hex(32)


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["pg_url", "sqlite_url"])
async def sessions(
    request: pytest.FixtureRequest,
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """PostgreSQL (cluster) and SQLite (embedded: timestamps come back without a zone)."""
    engine = make_engine(request.getfixturevalue(request.param))
    yield make_sessionmaker(engine)
    await engine.dispose()


async def _key(
    sessions: async_sessionmaker[AsyncSession], tenant: str, **kw: object
) -> api_keys.IssuedKey:
    async with sessions() as s:
        try:
            await tenants.get_tenant(s, tenant)
        except Exception:
            await tenants.create_tenant(s, name=tenant, actor="test")
        return await api_keys.create_key(s, tenant, secret_key=SECRET, actor="test", **kw)  # type: ignore[arg-type]


async def test_principal_carries_tenant_and_scopes(sessions) -> None:
    issued = await _key(sessions, "acme", scopes=["inference", "usage:read"])
    auth = KeyAuthenticator(sessions, secret_key=SECRET, ttl_s=5)
    p = await auth.authenticate(issued.key)
    assert p.tenant_name == "acme" and p.key_id == issued.row.id
    assert p.scopes == frozenset({"inference", "usage:read"})
    assert p.has("inference") and not p.has("adapters:write")


async def test_revocation_takes_effect_when_the_cache_entry_expires(sessions) -> None:
    issued = await _key(sessions, "acme")
    clock = Clock()
    auth = KeyAuthenticator(sessions, secret_key=SECRET, ttl_s=5, clock=clock)
    await auth.authenticate(issued.key)
    async with sessions() as s:  # as another replica's admin call would
        await api_keys.revoke_key(s, "acme", issued.row.id, actor="test")
    clock.now += 4.9
    await auth.authenticate(issued.key)  # still cached
    clock.now += 0.2
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.authenticate(issued.key)


async def test_forget_drops_the_entry_at_once(sessions) -> None:
    issued = await _key(sessions, "acme")
    auth = KeyAuthenticator(sessions, secret_key=SECRET, ttl_s=60, clock=Clock())
    await auth.authenticate(issued.key)
    async with sessions() as s:
        await api_keys.revoke_key(s, "acme", issued.row.id, actor="test")
    auth.forget(issued.row.prefix)
    with pytest.raises(Unauthenticated):
        await auth.authenticate(issued.key)


async def test_expiry_is_checked_on_every_request(sessions) -> None:
    issued = await _key(sessions, "acme", expires_at=utcnow() + timedelta(seconds=60))
    auth = KeyAuthenticator(sessions, secret_key=SECRET, ttl_s=3600, clock=Clock())
    await auth.authenticate(issued.key)
    async with sessions() as s:
        row = await s.get(ApiKey, issued.row.id)
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
        await s.commit()
    auth.forget(issued.row.prefix)
    with pytest.raises(Unauthenticated, match="expired"):
        await auth.authenticate(issued.key)


async def test_wrong_secret_unknown_prefix_and_garbage(sessions) -> None:
    issued = await _key(sessions, "acme")
    auth = KeyAuthenticator(sessions, secret_key=SECRET, ttl_s=5)
    prefix = issued.row.prefix
    for token in [None, "", "garbage", f"lpx_{prefix}_{'A' * 43}", "lpx_ffffffffffff_abc"]:
        with pytest.raises(Unauthenticated):
            await auth.authenticate(token)
    other = KeyAuthenticator(sessions, secret_key=secrets.token_hex(32), ttl_s=5)
    with pytest.raises(Unauthenticated):  # another deployment's secret key
        await other.authenticate(issued.key)


async def test_suspended_tenant_is_forbidden(sessions) -> None:
    issued = await _key(sessions, "sleepy")
    async with sessions() as s:
        await tenants.update_tenant(s, "sleepy", actor="test", status="suspended")
    auth = KeyAuthenticator(sessions, secret_key=SECRET, ttl_s=5)
    with pytest.raises(Forbidden):
        await auth.authenticate(issued.key)


async def test_last_used_is_written_in_one_batch(sessions) -> None:
    one, two = await _key(sessions, "acme"), await _key(sessions, "acme")
    auth = KeyAuthenticator(sessions, secret_key=SECRET, ttl_s=5)
    for _ in range(20):
        await auth.authenticate(one.key)
    await auth.authenticate(two.key)
    async with sessions() as s:
        used = await s.scalar(select(func.count()).where(ApiKey.last_used_at.is_not(None)))
    assert used == 0  # nothing written per request
    await auth.flush()
    async with sessions() as s:
        rows = (await s.scalars(select(ApiKey).order_by(ApiKey.created_at))).all()
    assert all(r.last_used_at is not None for r in rows)
    await auth.aclose()


async def test_negative_answers_are_cached_and_bounded(sessions) -> None:
    auth = KeyAuthenticator(sessions, secret_key=SECRET, ttl_s=5, max_entries=3)
    for i in range(10):
        with pytest.raises(Unauthenticated):
            await auth.authenticate(f"lpx_{i:012x}_{'a' * 43}")
    assert len(auth._cache) <= 3


async def test_principal_carries_plan_prices_and_merged_limits(sessions) -> None:
    async with sessions() as s:
        await plans.create_plan(
            s, name="pro", actor="test", prompt_price_micros=100, completion_price_micros=300,
            limits={"requests_per_minute": 600, "tokens_per_minute": 10_000},
        )  # fmt: skip
        await tenants.create_tenant(
            s, name="planned", actor="test", plan="pro", limits={"requests_per_minute": 60}
        )
    issued = await _key(sessions, "planned", limits={"max_concurrent": 2})
    p = await KeyAuthenticator(sessions, secret_key=SECRET, ttl_s=5).authenticate(issued.key)
    assert p.plan_name == "pro"
    assert (p.prompt_price_micros, p.completion_price_micros) == (100, 300)
    assert p.tenant_limits == {"requests_per_minute": 60, "tokens_per_minute": 10_000}
    assert p.key_limits == {"max_concurrent": 2}


async def test_forget_tenant_drops_all_its_keys(sessions) -> None:
    one, two = await _key(sessions, "acme"), await _key(sessions, "acme")
    other = await _key(sessions, "globex")
    auth = KeyAuthenticator(sessions, secret_key=SECRET, ttl_s=3600, clock=Clock())
    for issued in (one, two, other):
        await auth.authenticate(issued.key)
    async with sessions() as s:
        tenant = await tenants.update_tenant(s, "acme", actor="test", status="suspended")
    auth.forget_tenant(tenant.id)
    for issued in (one, two):
        with pytest.raises(Forbidden):
            await auth.authenticate(issued.key)
    await auth.authenticate(other.key)


class CountingSessions:
    """The real session factory, counting the sessions opened (one per key lookup)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.opened = 0

    def __call__(self) -> AsyncSession:
        self.opened += 1
        return self.sessions()


async def test_a_burst_with_a_key_not_cached_looks_it_up_once(sessions) -> None:
    # (200 lookups at once would take every pooled connection of a just-started worker)
    issued = await _key(sessions, "acme")
    counting = CountingSessions(sessions)
    auth = KeyAuthenticator(counting, secret_key=SECRET, ttl_s=5)  # type: ignore[arg-type]
    principals = await asyncio.gather(*(auth.authenticate(issued.key) for _ in range(200)))
    assert {p.key_id for p in principals} == {issued.row.id}
    assert counting.opened == 1
    with pytest.raises(Unauthenticated):  # the same prefix, a wrong secret: still refused
        await auth.authenticate(issued.key[:-4] + "AAAA")
    assert counting.opened == 1


async def test_a_caller_that_leaves_does_not_cancel_the_lookup_of_the_others(sessions) -> None:
    issued = await _key(sessions, "acme")
    auth = KeyAuthenticator(sessions, secret_key=SECRET, ttl_s=5)
    leaving = asyncio.create_task(auth.authenticate(issued.key))
    staying = asyncio.create_task(auth.authenticate(issued.key))
    await asyncio.sleep(0)  # both wait for the one lookup now
    leaving.cancel()
    assert (await staying).key_id == issued.row.id
    with pytest.raises(asyncio.CancelledError):
        await leaving
