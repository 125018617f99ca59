"""Builds the metering side of the app in its lifespan: metrics registry, limiter, ledger
(outbox + writer task) and the daily usage export task. Nothing here exists at import."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.storage import open_store
from admin.daily_export import DailyExporter
from gateway.budget_sync import run_budget_sync
from gateway.ledger import Ledger
from gateway.ledger_writer import LedgerWriter
from gateway.limiter_broker import BrokerLimiter
from gateway.limiter_memory import InProcessLimiter
from gateway.limiter_redis import RedisLimiter
from gateway.limits import Limiter
from gateway.metrics import Metrics, engine_stats_of
from gateway.outbox import Outbox
from gateway.settings import GatewaySettings

log = logging.getLogger("loraplex.billing")


@dataclass
class Billing:
    metrics: Metrics
    limiter: Limiter
    ledger: Ledger
    writer: LedgerWriter


def build_limiter(settings: GatewaySettings, metrics: Metrics) -> Limiter:
    """Redis when configured (shared by every replica); else the limits broker of this
    worker's supervisor (shared by its workers); else this process's own."""
    if settings.redis_url:
        return RedisLimiter.from_url(
            settings.redis_url,
            metrics,
            lease_s=settings.limits_lease_s,
            rates_fail_open=settings.limits_rates_fail_open,
            budgets_fail_open=settings.limits_budgets_fail_open,
            timeout_s=settings.limits_redis_timeout_s,
        )
    if settings.limits_broker_url:
        return BrokerLimiter(
            settings.limits_broker_url,
            metrics,
            rates_fail_open=settings.limits_rates_fail_open,
            budgets_fail_open=settings.limits_budgets_fail_open,
            timeout_s=settings.limits_redis_timeout_s,
        )
    return InProcessLimiter(metrics, lease_s=settings.limits_lease_s)


def outbox_path_for(settings: GatewaySettings) -> Path:
    """The configured outbox, else one per ledger database in the data dir (named by the
    database's host, port and name: not its credentials, which may rotate), so processes
    sharing a data dir but not a database never drain each other's usage."""
    if settings.ledger_outbox_path is not None:
        return settings.ledger_outbox_path
    url = make_url(settings.resolved_database_url())
    ident = f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{url.database or ''}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return settings.data_dir / f"usage-outbox-{digest}.sqlite"


@asynccontextmanager
async def open_billing(
    settings: GatewaySettings,
    sessions: async_sessionmaker[AsyncSession],
    registry: CollectorRegistry,
    engine: Callable[[], Any],
) -> AsyncIterator[Billing]:
    """Yields the running parts; on exit flushes the outbox and drains what it can."""
    metrics = Metrics(
        registry, tenant_labels=settings.metrics_tenant_labels, engine_stats=engine_stats_of(engine)
    )
    outbox_path = outbox_path_for(settings)
    ledger = Ledger(Outbox(outbox_path), metrics)
    ledger.start()
    drain_outbox = Outbox(outbox_path)
    writer = LedgerWriter(
        drain_outbox,
        sessions,
        metrics,
        batch_size=settings.ledger_batch_size,
        wake=ledger.appended,
    )
    limiter = build_limiter(settings, metrics)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(writer.run(stop), name="ledger-writer")]
    if settings.limits_budget_sync_s > 0:
        sync = run_budget_sync(sessions, limiter, stop, interval_s=settings.limits_budget_sync_s)
        tasks.append(asyncio.create_task(sync, name="budget-sync"))
    exporter = _exporter(settings, sessions, metrics, drain_outbox)
    if exporter is not None:
        tasks.append(asyncio.create_task(exporter.run(stop), name="usage-export"))
    try:
        yield Billing(metrics, limiter, ledger, writer)
    finally:
        await ledger.aclose()  # everything recorded is now in the outbox
        stop.set()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain_once(), 5)  # best effort; the rest waits on disk
        writer.close()
        drain_outbox.close()  # the ledger's stays open: a request ending late still records
        await limiter.aclose()


def _exporter(
    settings: GatewaySettings,
    sessions: async_sessionmaker[AsyncSession],
    metrics: Metrics,
    outbox: Outbox,
) -> DailyExporter | None:
    url = settings.usage_export_url or settings.resolved_object_store_url()
    enabled = settings.usage_export_enabled
    if enabled is None:
        enabled = settings.usage_export_url is not None or url.startswith("s3://")
    if not enabled:
        return None
    try:
        store = open_store(url, endpoint_url=settings.s3_endpoint_url)
    except Exception:
        log.exception("usage export disabled: cannot open %s", url)
        return None
    return DailyExporter(
        sessions,
        store,
        after_hour_utc=settings.usage_export_after_hour_utc,
        record=lambda outcome: metrics.usage_exports.labels(outcome).inc(),
        ledger_behind=lambda: _behind(outbox),
    )


async def _behind(outbox: Outbox, lag_s: float = 60.0) -> bool:
    """This replica's writer is behind (the database was away): an export now could miss
    rows of the day, so the exporter waits."""
    stats = await asyncio.to_thread(outbox.stats)
    oldest = stats.oldest_enqueued_at
    return oldest is not None and time.time() - oldest > lag_s
