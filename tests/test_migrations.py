"""Migrations produce exactly ``tenancy.models`` on PostgreSQL and SQLite, and go back down."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from harness import services
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from loraplex.migrations import runner
from loraplex.tenancy.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own (these tests drop the schema)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
        return
    services.ensure_postgres()
    url = services.create_database()
    try:
        yield url
    finally:
        services.drop_database(url)


def _inspect(url: str, fn: Any) -> Any:
    async def go() -> Any:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(fn)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _diff(url: str) -> list[Any]:
    def compare(conn: Any) -> list[Any]:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))

    return list(_inspect(url, compare))


def _tables(url: str) -> set[str]:
    return set(_inspect(url, lambda conn: inspect(conn).get_table_names()))


def test_one_head() -> None:
    assert len(runner.heads()) == 1


def test_upgrade_matches_models_then_downgrade(empty_db: str) -> None:
    runner.upgrade(empty_db)
    assert _tables(empty_db) == {*Base.metadata.tables, "alembic_version"}
    assert _diff(empty_db) == []

    runner.downgrade(empty_db, "base")
    assert _tables(empty_db) == {"alembic_version"}

    runner.upgrade(empty_db)  # and up again: the downgrade left nothing behind
    assert _diff(empty_db) == []


def test_upgrade_is_idempotent(empty_db: str) -> None:
    runner.upgrade(empty_db)
    runner.upgrade(empty_db)
    assert _diff(empty_db) == []


def test_harness_databases_match_models(sqlite_url: str, pg_url: str) -> None:
    """The harness fixtures ran migrations already; models agree on both backends."""
    assert _diff(sqlite_url) == []
    assert _diff(pg_url) == []
