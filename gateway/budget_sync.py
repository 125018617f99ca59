"""Keeps the limiter's monthly budget counters at least at what the ledger holds.

The counters live in Redis (or in process memory) and are only an enforcement cache: a
Redis restart without persistence, or a settlement lost while Redis was unreachable,
would otherwise hand a tenant a fresh budget. At startup and every ``interval_s`` the
month's usage is summed from the ledger per tenant and per key, and each counter is
raised to at least that (never lowered: settlements not yet in the ledger stay counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.gateway.limits import Limiter, MonthUsage, month_key
from loraplex.tenancy.usage_service import month_start, totals_by_key

log = logging.getLogger("loraplex.limits")


async def ledger_month_usage(
    sessions: async_sessionmaker[AsyncSession], now: datetime
) -> list[MonthUsage]:
    start = month_start(now)
    async with sessions() as session:
        rows = await totals_by_key(session, start, now)
    month = month_key(start)
    tenants: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    usage: list[MonthUsage] = []
    for r in rows:
        t = tenants[str(r.tenant_id)]
        t[0] += r.tokens
        t[1] += r.cost_micros
        if r.api_key_id is not None:
            usage.append(
                MonthUsage(str(r.tenant_id), str(r.api_key_id), month, r.tokens, r.cost_micros)
            )
    usage += [MonthUsage(tid, None, month, tok, cost) for tid, (tok, cost) in tenants.items()]
    return usage


async def sync_budgets(
    sessions: async_sessionmaker[AsyncSession],
    limiter: Limiter,
    now: Callable[[], datetime] | None = None,
) -> int:
    usage = await ledger_month_usage(sessions, (now or (lambda: datetime.now(UTC)))())
    await limiter.sync_month(usage)
    return len(usage)


async def run_budget_sync(
    sessions: async_sessionmaker[AsyncSession],
    limiter: Limiter,
    stop: asyncio.Event,
    *,
    interval_s: float,
) -> None:
    while not stop.is_set():
        try:
            n = await sync_budgets(sessions, limiter)
            log.debug("budget counters synced from the ledger for %d scopes", n)
        except Exception as exc:  # database or Redis away: try again next round
            log.warning("budget sync failed (%s: %s)", type(exc).__name__, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
