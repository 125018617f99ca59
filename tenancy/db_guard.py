"""Database sessions behind the database's circuit breaker, with outages as one domain error.

Every database call of the services runs in ``async with sessions() as s:``. A
:class:`GuardedSession` asks the breaker before its first connection (``get_bind``, so a
session that never touches the database costs nothing and a refused one costs no I/O),
and when it ends it tells the breaker what happened: an outage error (refused, reset,
timed out, pool exhausted, a server shutting down or cancelling the statement) is a
failure, anything else after a connection was made is a success. The half-open probe's
success is told as soon as it holds a live connection (see ``_probe_connected``). An
outage error leaves
the session as :class:`tenancy.errors.DatabaseUnavailable` (503 with ``Retry-After``), so
services and routes see one typed error whatever the driver raised.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from loraplex.tenancy.breaker import CircuitBreaker, CircuitOpen
from loraplex.tenancy.errors import DatabaseUnavailable

# SQLSTATE classes of an unavailable server: 08 connection exception, 53 insufficient
# resources (too many connections), 57 operator intervention (statement timeout, shutdown,
# cannot connect now).
_OUTAGE_SQLSTATE_CLASSES = ("08", "53", "57")


def _sqlstate(exc: BaseException) -> str:
    for err in (exc, getattr(exc, "orig", None), getattr(exc, "__cause__", None)):
        code = getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)
        if isinstance(code, str):
            return code
    return ""


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the database could not be reached or could not answer in time
    (rather than a refusal of the statement: constraints, bad data, a bug)."""
    if isinstance(exc, OSError | sa_exc.TimeoutError):  # OSError: refused, reset, timeouts
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return True
    if isinstance(exc.__cause__, OSError):
        return True
    return _sqlstate(exc)[:2] in _OUTAGE_SQLSTATE_CLASSES


class GuardedSyncSession(Session):
    """The sync half: admits its first connection through the breaker."""

    def __init__(self, *args: Any, breaker: CircuitBreaker, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.breaker = breaker
        self.admitted = False  # passed the breaker: the session reached for a connection
        self.probe = False  # it is the breaker's half-open probe

    def get_bind(self, *args: Any, **kw: Any) -> Any:
        if not self.admitted:
            self.probe = self.breaker.before_call()  # raises CircuitOpen
            self.admitted = True
        return super().get_bind(*args, **kw)


@event.listens_for(GuardedSyncSession, "after_begin")
def _probe_connected(session: Session, _transaction: Any, _connection: Any) -> None:
    """The probe's verdict as soon as it holds a live connection (the pool's pre-ping has
    answered), not when its session closes: a route's session closes after its response is
    sent, so a client that got the probe's answer could otherwise be refused by a breaker
    still waiting on that very probe."""
    if isinstance(session, GuardedSyncSession) and session.probe:
        session.probe = False
        session.breaker.record_success()


class GuardedSession(AsyncSession):
    """``async_sessionmaker(engine, class_=GuardedSession, breaker=...)`` makes these."""

    sync_session_class = GuardedSyncSession
    sync_session: GuardedSyncSession

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await super().__aexit__(exc_type, exc, tb)
        except Exception as closing:
            if exc is None:
                self._settle(closing)
            raise
        self._settle(exc)

    def _settle(self, exc: BaseException | None) -> None:
        """Report the outcome to the breaker; raise the domain error for an outage."""
        s = self.sync_session
        if isinstance(exc, CircuitOpen):
            raise DatabaseUnavailable(
                "The database is unavailable; retry shortly.", retry_after=exc.retry_after
            ) from None
        if not s.admitted:
            return
        probe, s.admitted, s.probe = s.probe, False, False  # a closed session may be reused
        if exc is None:
            s.breaker.record_success()
        elif isinstance(exc, DatabaseUnavailable) or not isinstance(exc, Exception):
            if probe:  # cancelled, or a nested session's outage: no verdict
                s.breaker.release_probe()
        elif is_outage(exc):
            s.breaker.record_failure()
            raise DatabaseUnavailable(
                "The database is unavailable; retry shortly.",
                retry_after=s.breaker.retry_after(),
            ) from exc
        else:  # the database answered (a constraint, a domain error raised after a query)
            s.breaker.record_success()
