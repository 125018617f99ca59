"""Collect stored bundles that no ready version references (deleted, or orphaned by a
failed commit), once they are older than a grace period that covers any upload in flight."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.adapters.errors import StoreUnavailable
from loraplex.adapters.storage import ObjectStore, StoreError
from loraplex.adapters.values import GcReport
from loraplex.tenancy.models import AdapterVersion


async def collect_garbage(
    sessions: async_sessionmaker[AsyncSession],
    store: ObjectStore,
    *,
    grace: timedelta = timedelta(hours=1),
) -> GcReport:
    cutoff = datetime.now(UTC) - grace
    async with sessions() as s:
        live = set(
            (
                await s.scalars(
                    select(AdapterVersion.storage_key)
                    .where(AdapterVersion.status == "ready")
                    .distinct()
                )
            ).all()
        )

    def sweep() -> GcReport:
        deleted = freed = 0
        for obj in list(store.list()):
            if obj.key.startswith("blobs/") and obj.key not in live and obj.modified <= cutoff:
                store.delete(obj.key)
                deleted += 1
                freed += obj.size
        aborted = store.cleanup_incomplete(cutoff)
        return GcReport(deleted_objects=deleted, deleted_bytes=freed, aborted_uploads=aborted)

    try:
        return await asyncio.to_thread(sweep)
    except StoreError as exc:  # what was deleted before stays deleted; the rest waits
        raise StoreUnavailable(
            "object store unavailable; garbage collection stopped",
            retry_after=exc.retry_after or 1.0,
        ) from exc
