"""Builds the metering side of the app in its lifespan: metrics registry, limiter, ledger
(the outbox every worker appends to) and the background jobs (ledger writer, budget sync,
daily usage export), which one process per data dir runs: the holder of its leader lock
(``gateway.leader``). Nothing here exists at import."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.gateway.background import BackgroundJobs
from loraplex.gateway.leader import LeaderLock, lead_when_possible
from loraplex.gateway.ledger import Ledger
from loraplex.gateway.limiter_broker import BrokerLimiter
from loraplex.gateway.limiter_memory import InProcessLimiter
from loraplex.gateway.limiter_redis import RedisLimiter
from loraplex.gateway.limits import Limiter
from loraplex.gateway.metrics import Metrics, engine_stats_of
from loraplex.gateway.outbox import Outbox
from loraplex.gateway.settings import GatewaySettings

log = logging.getLogger("loraplex.billing")


@dataclass
class Billing:
    metrics: Metrics
    limiter: Limiter
    ledger: Ledger


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
    """Yields the running parts; on exit flushes the outbox and, in the process that runs
    the background jobs (or can take them over now), drains what it can."""
    metrics = Metrics(
        registry, tenant_labels=settings.metrics_tenant_labels, engine_stats=engine_stats_of(engine)
    )
    outbox_path = outbox_path_for(settings)
    fsync = settings.ledger_fsync == "response"
    # commits on the event loop never checkpoint (an fsync); the ledger's syncer does that
    outbox = Outbox(outbox_path, fsync_commits=fsync, checkpoints=fsync)
    ledger = Ledger(outbox, metrics)
    ledger.start()
    limiter = build_limiter(settings, metrics)
    jobs = BackgroundJobs(settings, sessions, metrics, limiter, outbox_path, wake=ledger.appended)
    lock = LeaderLock(leader_lock_path(outbox_path))
    stop = asyncio.Event()
    leading = asyncio.create_task(
        lead_when_possible(lock, jobs.run, stop, on_lead=lambda: metrics.leader.set(1)),
        name="background-jobs",
    )
    try:
        yield Billing(metrics, limiter, ledger)
    finally:
        await ledger.aclose()  # everything recorded is now in the outbox
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(leading, 10)
        with contextlib.suppress(OSError):
            if lock.try_acquire():  # the leader, or a worker outliving it
                await jobs.drain_at_exit()
        jobs.close()  # the ledger's outbox stays open: a request ending late still records
        lock.release()
        metrics.leader.set(0)
        await limiter.aclose()


def leader_lock_path(outbox_path: Path) -> Path:
    """One leader per outbox (a data dir holds one outbox per ledger database)."""
    return outbox_path.with_name(outbox_path.name + ".leader")
