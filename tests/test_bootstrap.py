"""First-start bootstrap: creates once, stores only hashes, verifies the admin token."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from loraplex.tenancy.bootstrap import bootstrap, verify_admin_token
from loraplex.tenancy.db import make_engine, make_sessionmaker
from loraplex.tenancy.keys import hash_secret, parse_key
from loraplex.tenancy.models import AdminToken, ApiKey, Tenant
from loraplex.tenancy.principal import SCOPES

SECRET = "s" * 32


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


async def test_first_start_creates_then_nothing(db_url: str) -> None:
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    try:
        first = await bootstrap(sessions, secret_key=SECRET, admin_token_configured=False)
        assert first.tenant_created and first.api_key and first.admin_token
        assert first.api_key in first.banner() and first.admin_token in first.banner()
        parsed = parse_key(first.api_key)
        assert parsed is not None
        async with sessions() as s:
            key = await s.scalar(select(ApiKey))
            assert key is not None and key.prefix == parsed[0]
            assert key.secret_hash == hash_secret(SECRET, parsed[1])
            assert set(key.scopes) == set(SCOPES)
            token = await s.scalar(select(AdminToken))
            assert token is not None and first.admin_token not in token.token_hash
            assert await verify_admin_token(
                s, secret_key=SECRET, configured_token=None, presented=first.admin_token
            )
            assert not await verify_admin_token(
                s, secret_key=SECRET, configured_token=None, presented=first.admin_token + "x"
            )

        again = await bootstrap(sessions, secret_key=SECRET, admin_token_configured=False)
        assert again.api_key is None and again.admin_token is None and again.banner() == ""
        async with sessions() as s:
            assert await s.scalar(select(func.count()).select_from(Tenant)) == 1
            assert await s.scalar(select(func.count()).select_from(ApiKey)) == 1
            assert await s.scalar(select(func.count()).select_from(AdminToken)) == 1
    finally:
        await engine.dispose()


async def test_configured_admin_token_is_not_generated(db_url: str) -> None:
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    try:
        result = await bootstrap(sessions, secret_key=SECRET, admin_token_configured=True)
        assert result.api_key and result.admin_token is None
        async with sessions() as s:
            assert await s.scalar(select(func.count()).select_from(AdminToken)) == 0
            tok = "t" * 40
            assert await verify_admin_token(
                s, secret_key=SECRET, configured_token=tok, presented=tok
            )
            assert not await verify_admin_token(
                s, secret_key=SECRET, configured_token=tok, presented="u" * 40
            )
    finally:
        await engine.dispose()
