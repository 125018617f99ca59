"""Database engine and session factory, built by the app lifespan (never at import).

Every call is bounded (:class:`DbTimeouts`): PostgreSQL gets a connect timeout, a
server-side ``statement_timeout`` and a client-side command timeout a little longer (a
black-holed server never sends the cancellation), and a pool checkout timeout; SQLite
gets a busy timeout. With a breaker, sessions are :class:`tenancy.db_guard.GuardedSession`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from loraplex.tenancy.breaker import CircuitBreaker
from loraplex.tenancy.db_guard import GuardedSession

# The client waits a little longer than the server's statement_timeout (as much again, at
# most this), so a slow statement is cancelled by the server (the connection stays usable)
# before the client gives up on a server that does not answer at all.
CLIENT_MARGIN_S = 1.0


@dataclass(frozen=True)
class DbTimeouts:
    connect_s: float = 3.0
    statement_s: float = 5.0
    pool_checkout_s: float = 3.0


def make_engine(url: str, timeouts: DbTimeouts | None = None) -> AsyncEngine:
    t = timeouts or DbTimeouts()
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": t.statement_s})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    connect_args = {
        "timeout": t.connect_s,
        "command_timeout": t.statement_s + min(t.statement_s, CLIENT_MARGIN_S),
        "server_settings": {"statement_timeout": str(int(t.statement_s * 1000))},
    }
    return create_async_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=20,
        pool_timeout=t.pool_checkout_s,
        connect_args=connect_args,
    )


def make_sessionmaker(
    engine: AsyncEngine, breaker: CircuitBreaker | None = None
) -> async_sessionmaker[AsyncSession]:
    """Plain sessions, or with ``breaker`` sessions that pass the database's breaker."""
    if breaker is None:
        return async_sessionmaker(engine, expire_on_commit=False)
    return async_sessionmaker(
        engine, class_=GuardedSession, expire_on_commit=False, breaker=breaker
    )
