"""The background jobs of a data dir, run by its leader process (``gateway.leader``): the
ledger writer (drains the shared outbox into the database), the budget sync (raises the
limiter's month counters to the ledger's) and the daily usage export.

Nothing is opened until this process leads: the drain side of the outbox, the writer and
the export's object store belong to the leader alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.adapters.service import s3_options
from loraplex.adapters.storage import open_store
from loraplex.admin.daily_export import DailyExporter
from loraplex.gateway.budget_sync import run_budget_sync
from loraplex.gateway.ledger_writer import LedgerWriter
from loraplex.gateway.limits import Limiter
from loraplex.gateway.metrics import Metrics
from loraplex.gateway.outbox import Outbox
from loraplex.gateway.settings import GatewaySettings

log = logging.getLogger("loraplex.billing")


class BackgroundJobs:
    def __init__(
        self,
        settings: GatewaySettings,
        sessions: async_sessionmaker[AsyncSession],
        metrics: Metrics,
        limiter: Limiter,
        outbox_path: Path,
        *,
        wake: asyncio.Event | None = None,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._metrics = metrics
        self._limiter = limiter
        self._outbox_path = outbox_path
        self._wake = wake  # set after this process's own appends; others' are polled
        self._outbox: Outbox | None = None
        self._writer: LedgerWriter | None = None

    def _open_writer(self) -> LedgerWriter:
        if self._writer is None:
            # a lost acknowledgement only redelivers rows, which the database skips: no fsync
            self._outbox = Outbox(self._outbox_path, fsync_commits=False)
            self._writer = LedgerWriter(
                self._outbox,
                self._sessions,
                self._metrics,
                batch_size=self._settings.ledger_batch_size,
                wake=self._wake,
            )
        return self._writer

    async def run(self, stop: asyncio.Event) -> None:
        """Every job until ``stop`` is set."""
        writer = self._open_writer()
        jobs = [asyncio.create_task(writer.run(stop), name="ledger-writer")]
        interval = self._settings.limits_budget_sync_s
        if interval > 0:
            sync = run_budget_sync(self._sessions, self._limiter, stop, interval_s=interval)
            jobs.append(asyncio.create_task(sync, name="budget-sync"))
        exporter = self._exporter()
        if exporter is not None:
            jobs.append(asyncio.create_task(exporter.run(stop), name="usage-export"))
        try:
            for job in asyncio.as_completed(jobs):
                try:
                    await job
                except Exception:
                    log.exception("a background job failed")
        finally:
            for job in jobs:
                job.cancel()

    async def drain_at_exit(self, timeout_s: float = 5.0) -> None:
        """One batch, best effort; the rest waits on disk for the next leader."""
        writer = self._open_writer()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain_once(), timeout_s)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._outbox is not None:
            self._outbox.close()

    def _exporter(self) -> DailyExporter | None:
        settings, outbox = self._settings, self._outbox
        url = settings.usage_export_url or settings.resolved_object_store_url()
        enabled = settings.usage_export_enabled
        if enabled is None:
            enabled = settings.usage_export_url is not None or url.startswith("s3://")
        if not enabled or outbox is None:
            return None
        try:
            store = open_store(url, endpoint_url=settings.s3_endpoint_url, s3=s3_options(settings))
        except Exception:
            log.exception("usage export disabled: cannot open %s", url)
            return None
        return DailyExporter(
            self._sessions,
            store,
            after_hour_utc=settings.usage_export_after_hour_utc,
            record=lambda outcome: self._metrics.usage_exports.labels(outcome).inc(),
            ledger_behind=lambda: _behind(outbox),
        )


async def _behind(outbox: Outbox, lag_s: float = 60.0) -> bool:
    """The outbox holds usage older than ``lag_s`` (the database was away): an export now
    could miss rows of the day, so the exporter waits."""
    stats = await asyncio.to_thread(outbox.stats)
    oldest = stats.oldest_enqueued_at
    return oldest is not None and time.time() - oldest > lag_s
