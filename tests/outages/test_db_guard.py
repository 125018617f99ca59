"""Guarded sessions on a real PostgreSQL behind a TCP proxy: an outage (refused or
black-holed) is one domain error within the timeouts, trips the breaker, and then costs
milliseconds; the database's refusals of a statement do not trip it. The key cache and
the model resolver serve their last known answers during the outage, for a bounded time."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from harness.tcp_proxy import TcpProxy
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loraplex.gateway.auth import KeyAuthenticator
from loraplex.gateway.resolve import ModelResolver
from loraplex.tenancy import api_keys, tenants
from loraplex.tenancy.breaker import CircuitBreaker
from loraplex.tenancy.db import DbTimeouts, make_engine, make_sessionmaker
from loraplex.tenancy.errors import DatabaseUnavailable, ModelNotFound, Unauthenticated
from loraplex.tenancy.models import Adapter, AdapterVersion, Tenant
from loraplex.tenancy.principal import Principal

SECRET = secrets.token_hex(32)
FAST = DbTimeouts(connect_s=0.3, statement_s=0.3, pool_checkout_s=0.3)
MODES = ["refuse", "blackhole"]


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Db:
    proxy: TcpProxy
    engine: AsyncEngine
    breaker: CircuitBreaker
    sessions: async_sessionmaker[AsyncSession]  # guarded, through the proxy
    direct: async_sessionmaker[AsyncSession]  # plain, not through the proxy
    clock: Clock

    async def down(self, mode: str) -> None:
        await (self.proxy.refuse() if mode == "refuse" else self.proxy.blackhole())


@pytest.fixture
async def db(pg_url: str, free_port: int) -> AsyncIterator[Db]:
    url = make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432, free_port)
    await proxy.restore()
    clock = Clock()
    breaker = CircuitBreaker("database", failure_threshold=2, open_s=30.0, clock=clock)
    proxied = make_engine(url.set(port=free_port).render_as_string(hide_password=False), FAST)
    plain = make_engine(pg_url)
    try:
        yield Db(
            proxy, proxied, breaker, make_sessionmaker(proxied, breaker),
            make_sessionmaker(plain), clock,
        )  # fmt: skip
    finally:
        await proxy.refuse()
        await proxied.dispose()
        await plain.dispose()


async def select_one(db: Db) -> float:
    """Runs ``SELECT 1``; returns how long the call took."""
    started = time.monotonic()
    try:
        async with db.sessions() as s:
            await s.execute(text("SELECT 1"))
    finally:
        elapsed = time.monotonic() - started
    return elapsed


async def test_refusals_of_a_statement_do_not_trip_it(db: Db) -> None:
    async with db.direct() as s:
        s.add(Tenant(name="acme"))
        await s.commit()
    for _ in range(3):
        with pytest.raises(IntegrityError):  # passes through as itself
            async with db.sessions() as s:
                s.add(Tenant(name="acme"))
                await s.commit()
    assert db.breaker.state == "closed"


async def test_statement_timeout_is_enforced_by_the_server(db: Db) -> None:
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as failed:
        async with db.sessions() as s:
            await s.execute(text("SELECT pg_sleep(5)"))
    assert time.monotonic() - started < 2.0
    assert getattr(failed.value.__cause__.orig, "sqlstate", None) == "57014"  # type: ignore[union-attr]
    assert await select_one(db) < 1.0  # the connection was cancelled, not lost


@pytest.mark.parametrize("mode", MODES)
async def test_outage_is_one_error_then_fails_fast_then_recovers(db: Db, mode: str) -> None:
    await select_one(db)  # a pooled connection exists
    await db.down(mode)
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as failed:
            await select_one(db)
        assert time.monotonic() - started < 3.0  # connect + statement timeouts, no hang
        assert failed.value.status == 503 and failed.value.retry_after >= 1
    assert db.breaker.state == "open"
    for _ in range(20):
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as failed:
            await select_one(db)
        assert time.monotonic() - started < 0.1  # refused by the breaker: no I/O
        assert failed.value.retry_after == pytest.approx(30.0)
    async with db.sessions():
        pass  # a session that never touches the database is not refused
    await db.proxy.restore()
    db.clock.now += 30.0  # the open interval is over: the next call probes
    assert await select_one(db) < 2.0
    assert db.breaker.state == "closed"


async def test_the_probe_closes_the_breaker_once_connected(db: Db) -> None:
    """A route's session ends after its response is sent: a client holding the probe's answer
    must not be refused by a breaker that still waits for that probe's session to close."""
    await db.down("refuse")
    for _ in range(2):
        with pytest.raises(DatabaseUnavailable):
            await select_one(db)
    assert db.breaker.state == "open"
    await db.proxy.restore()
    db.clock.now += 30.0
    async with db.sessions() as probe:
        await probe.execute(text("SELECT 1"))
        assert db.breaker.state == "closed"  # while the probe's session is still open
        assert await select_one(db) < 2.0  # another request is admitted meanwhile
    assert db.breaker.state == "closed"


async def _key(db: Db, tenant: str) -> api_keys.IssuedKey:
    async with db.direct() as s:
        await tenants.create_tenant(s, name=tenant, actor="test")
        return await api_keys.create_key(s, tenant, secret_key=SECRET, actor="test")


@pytest.mark.parametrize("mode", MODES)
async def test_known_keys_authenticate_during_an_outage_for_a_bounded_time(
    db: Db, mode: str
) -> None:
    issued, other = await _key(db, "acme"), await _key(db, "globex")
    auth = KeyAuthenticator(db.sessions, secret_key=SECRET, ttl_s=5, stale_s=60, clock=db.clock)
    principal = await auth.authenticate(issued.key)
    async with db.direct() as s:  # revoked by another replica: this one learns at its TTL
        await api_keys.revoke_key(s, "acme", issued.row.id, actor="test")
    await db.down(mode)
    db.clock.now += 10  # past the TTL, within the stale grace
    assert await auth.authenticate(issued.key) == principal
    with pytest.raises(DatabaseUnavailable):  # never seen: 503, not 401
        await auth.authenticate(other.key)
    db.clock.now += 60  # past the grace
    with pytest.raises(DatabaseUnavailable):
        await auth.authenticate(issued.key)
    await db.proxy.restore()
    db.clock.now += 30  # the breaker probes
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.authenticate(issued.key)  # the revocation applies once it answers
    assert (await auth.authenticate(other.key)).tenant_name == "globex"


@pytest.mark.parametrize("mode", MODES)
async def test_models_resolved_before_resolve_during_an_outage(db: Db, mode: str) -> None:
    async with db.direct() as s:
        tenant = Tenant(name="acme")
        s.add(tenant)
        await s.flush()
        adapter = Adapter(tenant_id=tenant.id, name="support", current_version=1)
        s.add(adapter)
        await s.flush()
        s.add(AdapterVersion(
            adapter_id=adapter.id, version=1, sha256="ab" * 32, storage_key="blobs/ab/x.tar",
            base_model="base", rank=8, alpha=16.0, target_modules=["q_proj"], bytes=10,
        ))  # fmt: skip
        await s.commit()
    who = Principal(tenant_id=tenant.id, tenant_name="acme", key_id=uuid.uuid4(),
                    scopes=frozenset({"inference"}))  # fmt: skip
    resolver = ModelResolver(db.sessions, stale_s=60, clock=db.clock)
    fresh = await resolver.resolve(who, "support", base_model="base")
    assert fresh.version is not None and fresh.version.version == 1
    with pytest.raises(ModelNotFound):
        await resolver.resolve(who, "other", base_model="base")
    await db.down(mode)
    assert (await resolver.resolve(who, "base", base_model="base")).version is None
    assert await resolver.resolve(who, "support", base_model="base") == fresh
    with pytest.raises(DatabaseUnavailable):  # not resolved before: 503, not 404
        await resolver.resolve(who, "support@1", base_model="base")
    db.clock.now += 61
    with pytest.raises(DatabaseUnavailable):
        await resolver.resolve(who, "support", base_model="base")
