"""Metering: ``Ledger.record(event)`` makes one request's usage durable in the outbox.

Call it exactly once per request, however the request ends (finished, cut off by the
client, failed), before the response finishes. Concurrent calls are group-committed:
one transaction for everything queued while the previous write ran.

Durable means, with an outbox that fsyncs its commits (``LORAPLEX_LEDGER_FSYNC=response``),
fsynced: the record survives an OS crash or a power loss. With one that does not
(``background``, the default), written to the OS: it survives a crash of any process
(SIGKILL included), and :class:`gateway.outbox_sync.OutboxSyncer` fsyncs it in the
background within about ``sync_gap_s``. Such a commit takes microseconds and is made on
the event loop; only when another process holds the outbox's lock does it go to a thread.

The event is queued synchronously, before the first ``await``: if the caller is then
cancelled (a client that disconnects cancels the streaming task), the event is still
written by the flusher task. Callers on a cancelled scope should nonetheless shield the
call (``anyio.CancelScope(shield=True)``) to wait for durability.

``LedgerWriter`` (``gateway.ledger_writer``) moves outbox rows into the database.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from loraplex.gateway.metrics import Metrics
from loraplex.gateway.outbox import Outbox
from loraplex.gateway.outbox_sync import OutboxSyncer
from loraplex.tenancy.usage import UsageEvent

log = logging.getLogger("loraplex.ledger")


class Ledger:
    def __init__(
        self, outbox: Outbox, metrics: Metrics, *, retry_s: float = 0.5, sync_gap_s: float = 0.05
    ) -> None:
        self._outbox = outbox
        self._syncer = None if outbox.fsync_commits else OutboxSyncer(outbox.path, sync_gap_s)
        self._metrics = metrics
        self._retry_s = retry_s
        self._pending: list[tuple[UsageEvent, asyncio.Future[None] | None]] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._writing = False  # the flusher is writing a batch
        self.appended = asyncio.Event()  # set after each durable append (wakes the writer)

    def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="ledger-flush")

    def record_nowait(self, event: UsageEvent, tenant: str = "") -> asyncio.Future[None]:
        """Queue the event; the future resolves once it is durable."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closing and (self._flusher is None or self._flusher.done()):
            # A request that ends during shutdown, after the flusher stopped: write it
            # here, blocking the loop for one fsync, rather than lose it.
            self._metrics.observe_usage(event, tenant)
            self._outbox.append([event])
            if not self._outbox.fsync_commits:
                self._outbox.sync()
            fut.set_result(None)
            return fut
        self._metrics.observe_usage(event, tenant)
        if self._syncer is not None and not self._pending and not self._writing:
            if self._append_now([event]):  # no task switch, nothing queued to go first
                fut.set_result(None)
                return fut
        self.start()
        self._pending.append((event, fut))
        self._wake.set()
        return fut

    async def record(self, event: UsageEvent, tenant: str = "") -> None:
        """Durable (see the module) when this returns."""
        fut = self.record_nowait(event, tenant)
        if not fut.done():
            await asyncio.shield(fut)
        fut.result()

    def _append_now(self, events: list[UsageEvent]) -> bool:
        """With an outbox that does not fsync commits: append on the event loop unless that
        would wait for another process's lock. An error leaves the events to the flusher."""
        assert self._syncer is not None
        try:
            if not self._outbox.try_append(events):
                return False
        except Exception:
            log.warning("usage outbox append failed; queued for a retry", exc_info=True)
            return False
        self._syncer.committed()
        self.appended.set()
        return True

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._pending = self._pending, []
            self._writing = True
            try:
                events = [e for e, _ in batch]
                if self._syncer is None or not self._append_now(events):
                    await loop.run_in_executor(self._executor, self._outbox.append, events)
                    if self._syncer is not None:
                        self._syncer.committed()
            except Exception as exc:  # disk full, I/O error: keep the events, tell callers
                log.exception("usage outbox append failed; retrying")
                for _, fut in batch:
                    if fut is not None and not fut.done():
                        fut.set_exception(OutboxUnavailable(str(exc)))
                self._pending = [(e, None) for e, _ in batch] + self._pending
                self._writing = False
                await asyncio.sleep(self._retry_s)
                continue
            self._writing = False
            for _, fut in batch:
                if fut is not None and not fut.done():
                    fut.set_result(None)
            self.appended.set()

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Write everything queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            try:
                await asyncio.wait_for(self._flusher, timeout_s)
            except TimeoutError:
                log.error("usage outbox unwritable at shutdown: %d events lost", len(self._pending))
        self._executor.shutdown(wait=True)
        if self._syncer is not None:
            await asyncio.to_thread(self._syncer.close)


class OutboxUnavailable(Exception):
    """The usage could not be made durable yet (it stays queued in memory and is retried)."""
