"""Builders for billing tests: tenants, usage events with known totals."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.tenancy.models import Plan, Tenant, UsageRecord
from loraplex.tenancy.usage import UsageEvent, UsageStatus, cost_micros

T0 = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)


async def make_tenant(
    sessions: async_sessionmaker[AsyncSession], name: str, plan: Plan | None = None
) -> uuid.UUID:
    async with sessions() as s:
        tenant = Tenant(name=name, plan_id=None if plan is None else plan.id)
        s.add(tenant)
        await s.commit()
        return tenant.id


def event(
    tenant_id: uuid.UUID,
    i: int,
    *,
    start: datetime = T0,
    step: timedelta = timedelta(minutes=7),
    prefix: str = "req",
    prices: tuple[int, int] = (150_000, 600_000),
) -> UsageEvent:
    """The i-th request of a deterministic series: tokens and times vary with i."""
    prompt, completion = 10 + i % 37, (i * 7) % 50
    started = start + step * i
    status: UsageStatus = ("ok", "ok", "aborted", "error")[i % 4]
    return UsageEvent(
        request_id=f"{prefix}-{tenant_id.hex[:8]}-{i}",
        tenant_id=tenant_id,
        api_key_id=None,
        adapter_version_id=None,
        model=("base", "support@3")[i % 2],
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=prompt // 3,
        status=status,
        started_at=started,
        finished_at=started + timedelta(milliseconds=40 * completion + 30),
        ttft_ms=30,
        duration_ms=40 * completion + 30,
        cost_micros=cost_micros(prompt, completion, *prices),
    )


async def ledger_rows(sessions: async_sessionmaker[AsyncSession]) -> dict[str, tuple[int, int]]:
    """request_id -> (prompt, completion) for every row in the ledger."""
    async with sessions() as s:
        rows = await s.execute(
            select(UsageRecord.request_id, UsageRecord.prompt_tokens, UsageRecord.completion_tokens)
        )
        return {rid: (p, c) for rid, p, c in rows}


async def ledger_count(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as s:
        return int((await s.execute(select(func.count(UsageRecord.id)))).scalar_one())
