"""The daily usage export to object storage: ``exports/dt=YYYY-MM-DD/usage.parquet``.

One file per UTC day, every request started that day (request granularity, all tenants).
Idempotent: the key depends only on the day and the bytes only on the ledger's rows, so
a rerun (the CLI, another replica, a restart) writes the same object again. The lifespan
task exports yesterday once ``after_hour_utc`` has passed (leaving the ledger writer time
to catch up), on startup and then daily, and waits while this replica's outbox holds rows
the database has not taken for a minute (an outage); ``loraplex export-usage --date`` runs
it by hand (rerun it for a day whose usage arrived late, e.g. from another replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.adapters.storage import ObjectStore
from loraplex.tenancy.usage_export import write_parquet
from loraplex.tenancy.usage_service import UsageQuery, stream_usage

log = logging.getLogger("loraplex.export")


def export_key(day: date) -> str:
    return f"exports/dt={day:%Y-%m-%d}/usage.parquet"


@dataclass(frozen=True)
class ExportResult:
    day: date
    key: str
    rows: int
    sha256: str


async def export_day(
    sessions: async_sessionmaker[AsyncSession], store: ObjectStore, day: date
) -> ExportResult:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    query = UsageQuery(start=start, end=start + timedelta(days=1), granularity="request")
    fd, name = tempfile.mkstemp(prefix=f"usage-{day}-", suffix=".parquet")
    os.close(fd)
    path = Path(name)
    try:
        async with sessions() as session:
            rows = await write_parquet(stream_usage(session, query), "request", path)
        digest = await asyncio.to_thread(_sha256, path)
        key = export_key(day)
        await asyncio.to_thread(store.put_file, key, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    log.info("usage export %s: %d rows, sha256 %s", key, rows, digest)
    return ExportResult(day, key, rows, digest)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


Recorder = Callable[[str], None]  # outcome -> metric


class DailyExporter:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        store: ObjectStore,
        *,
        after_hour_utc: int = 1,
        check_every_s: float = 300.0,
        record: Recorder | None = None,
        now: Callable[[], datetime] | None = None,
        ledger_behind: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._sessions = sessions
        self._store = store
        self._after = timedelta(hours=after_hour_utc)
        self._check_every_s = check_every_s
        self._record = record or (lambda _: None)
        self._now = now or (lambda: datetime.now(UTC))
        self._ledger_behind = ledger_behind
        self.last_exported: date | None = None

    def due(self) -> date | None:
        """Yesterday (UTC), once ``after_hour_utc`` of today has passed and not yet done."""
        now = self._now()
        if now - now.replace(hour=0, minute=0, second=0, microsecond=0) < self._after:
            return None
        day = now.date() - timedelta(days=1)
        return None if day == self.last_exported else day

    async def run_once(self) -> ExportResult | None:
        day = self.due()
        if day is None:
            return None
        if self._ledger_behind is not None and await self._ledger_behind():
            self._record("postponed")
            log.warning("usage export for %s postponed: the ledger writer is behind", day)
            return None
        try:
            result = await export_day(self._sessions, self._store, day)
        except Exception:
            self._record("error")
            log.exception("daily usage export for %s failed; retrying later", day)
            return None
        self.last_exported = day
        self._record("ok")
        return result

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.run_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._check_every_s)
