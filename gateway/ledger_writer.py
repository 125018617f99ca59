"""Moves usage from the outbox into the database's ledger, at least once, counted once.

A batch is read, inserted with ``ON CONFLICT (request_id) DO NOTHING``, committed, and
only then acknowledged (deleted from the outbox). A crash before the commit leaves the
rows in the outbox; a crash after the commit but before the ack redelivers them, and the
conflict clause skips them. A database outage only delays: the writer backs off and
retries while the outbox grows, and ``loraplex_ledger_lag_seconds`` shows how far behind
it is. Rows the database refuses for their data (not an outage) go to a dead-letter table
in the outbox, one by one, so one bad row never blocks the rest.

Woken by an append, the writer waits ``linger_s`` before it reads, so that it moves the
usage of many requests per batch rather than one (a drain is a database transaction and
an outbox transaction, in this process, beside the requests it serves).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.gateway.metrics import Metrics
from loraplex.gateway.outbox import Outbox, OutboxRow
from loraplex.tenancy.usage_service import insert_usage

log = logging.getLogger("loraplex.ledger")

Hook = Callable[[list[OutboxRow]], Awaitable[None]]


@dataclass(frozen=True)
class WriterHooks:
    """Fault-injection points (tests kill the writer in them)."""

    before_commit: Hook | None = None
    after_commit: Hook | None = None


class LedgerWriter:
    def __init__(
        self,
        outbox: Outbox,
        sessions: async_sessionmaker[AsyncSession],
        metrics: Metrics,
        *,
        batch_size: int = 500,
        idle_s: float = 0.5,
        linger_s: float = 0.1,
        retry_max_s: float = 5.0,
        wake: asyncio.Event | None = None,
        hooks: WriterHooks | None = None,
    ) -> None:
        self._outbox = outbox
        self._sessions = sessions
        self._metrics = metrics
        self._batch = batch_size
        self._idle_s = idle_s
        self._linger_s = linger_s
        self._retry_max_s = retry_max_s
        self._wake = wake
        self._hooks = hooks or WriterHooks()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-drain")

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def drain_once(self) -> int:
        """Commit one batch; returns how many outbox rows it took (0: the outbox is empty)."""
        rows: list[OutboxRow] = await self._io(self._outbox.read, self._batch)
        if not rows:
            return 0
        try:
            async with self._sessions() as session:
                inserted = await insert_usage(session, [r.event for r in rows])
                if self._hooks.before_commit is not None:
                    await self._hooks.before_commit(rows)
                await session.commit()
        except (IntegrityError, DataError):
            log.warning("a usage batch was refused; retrying row by row")
            inserted = await self._one_by_one(rows)
        else:
            if self._hooks.after_commit is not None:
                await self._hooks.after_commit(rows)
            await self._io(self._outbox.ack, [r.seq for r in rows])
        self._metrics.ledger_written.inc(inserted)
        return len(rows)

    async def _one_by_one(self, rows: list[OutboxRow]) -> int:
        inserted = 0
        for row in rows:
            try:
                async with self._sessions() as session:
                    inserted += await insert_usage(session, [row.event])
                    await session.commit()
            except (IntegrityError, DataError) as exc:
                log.error("usage record %s refused, dead-lettered: %s", row.event.request_id, exc)
                await self._io(self._outbox.dead_letter, row, str(exc))
                continue
            await self._io(self._outbox.ack, [row.seq])
        return inserted

    async def update_lag(self) -> None:
        stats = await self._io(self._outbox.stats)
        self._metrics.ledger_pending.set(stats.pending)
        self._metrics.ledger_dead.set(stats.dead)
        lag = 0.0 if stats.oldest_enqueued_at is None else time.time() - stats.oldest_enqueued_at
        self._metrics.ledger_lag.set(max(0.0, lag))

    async def run(self, stop: asyncio.Event) -> None:
        """Drain until ``stop`` is set, backing off while the database is unreachable."""
        backoff = 0.1
        while not stop.is_set():
            try:
                taken = await self.drain_once()
                backoff = 0.1
            except Exception as exc:  # the database is down or unreachable: retry later
                self._metrics.ledger_errors.inc()
                log.warning(
                    "ledger write failed (%s: %s); retry in %.1fs", type(exc).__name__, exc, backoff
                )
                await self.update_lag()
                await self._sleep(stop, backoff, wakeable=False)
                backoff = min(backoff * 2, self._retry_max_s)
                continue
            await self.update_lag()
            if taken < self._batch:
                await self._sleep(stop, self._idle_s)

    async def _sleep(self, stop: asyncio.Event, seconds: float, *, wakeable: bool = True) -> None:
        waits = [asyncio.ensure_future(stop.wait())]
        wake = self._wake if wakeable else None
        if wake is not None:
            waits.append(asyncio.ensure_future(wake.wait()))
        _, pending = await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if wake is not None:
            if wake.is_set() and not stop.is_set():
                await asyncio.sleep(self._linger_s)  # let more requests' usage come
            wake.clear()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
