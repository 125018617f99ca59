"""The usage ledger in the database: idempotent inserts, and reads for export and totals.

``insert_usage`` uses ``ON CONFLICT (request_id) DO NOTHING`` so a redelivered outbox row
never counts twice. Reads stream in ``started_at`` order; hour and day rows are summed
while streaming (one bucket's tenant x adapter groups in memory at a time), the same on
PostgreSQL and SQLite.

Hour and day rows are per adapter, whatever name called it: ``support``, ``support@1`` and
the alias ``prod`` are one row, ``adapter`` ``support``, with the names used in ``model``
(``prod, support, support@1``). Base-model requests (and records whose adapter version is
unknown) are grouped by the model name used, which is then also their ``adapter``.
Request rows carry ``adapter`` and ``adapter_version`` beside the ``model`` name used.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from loraplex.tenancy.errors import InvalidInput
from loraplex.tenancy.models import Adapter, AdapterVersion, Tenant, UsageRecord
from loraplex.tenancy.usage import UsageEvent

Granularity = Literal["request", "hour", "day"]
GRANULARITIES: tuple[Granularity, ...] = ("request", "hour", "day")

REQUEST_COLUMNS = (
    "request_id",
    "tenant",
    "tenant_id",
    "api_key_id",
    "adapter_version_id",
    "adapter",
    "adapter_version",
    "model",
    "status",
    "started_at",
    "finished_at",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_micros",
    "ttft_ms",
    "duration_ms",
)
BUCKET_COLUMNS = (
    "period_start",
    "tenant",
    "tenant_id",
    "adapter",
    "model",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_micros",
)


def _row(event: UsageEvent) -> dict[str, Any]:
    return {
        "request_id": event.request_id,
        "tenant_id": event.tenant_id,
        "api_key_id": event.api_key_id,
        "adapter_version_id": event.adapter_version_id,
        "model": event.model,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "cached_tokens": event.cached_tokens,
        "status": event.status,
        "started_at": event.started_at,
        "finished_at": event.finished_at,
        "ttft_ms": event.ttft_ms,
        "duration_ms": event.duration_ms,
        "cost_micros": event.cost_micros,
    }


async def insert_usage(session: AsyncSession, events: Sequence[UsageEvent]) -> int:
    """Insert what is new; returns how many rows were inserted (redeliveries are skipped).
    The caller commits."""
    if not events:
        return 0
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = (
        insert(UsageRecord)
        .on_conflict_do_nothing(index_elements=["request_id"])
        .returning(UsageRecord.request_id)
    )
    # The rows as parameters, not in the statement (.values(rows)): one compiled statement
    # for every batch size (SQLAlchemy's cache), ~half a drain's CPU; RETURNING counts
    # what was new.
    result = await session.execute(stmt, [_row(e) for e in events])
    return len(result.all())


@dataclass(frozen=True)
class UsageQuery:
    start: datetime
    end: datetime  # exclusive
    tenant_id: uuid.UUID | None = None
    granularity: Granularity = "request"

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise InvalidInput("from and to need a time zone (UTC: ...Z)", param="from")
        if self.end <= self.start:
            raise InvalidInput("`to` must be after `from`", param="to")
        if self.granularity not in GRANULARITIES:
            raise InvalidInput(
                f"granularity must be one of {', '.join(GRANULARITIES)}", param="granularity"
            )


def parse_time(value: str, param: str) -> datetime:
    """``2026-11-23`` (midnight UTC) or an ISO 8601 time; a time without zone is UTC."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(
            f"{param} must be a date (2026-11-23) or an ISO 8601 time (2026-11-23T05:00:00Z)",
            param=param,
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def month_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def columns(granularity: Granularity) -> tuple[str, ...]:
    return REQUEST_COLUMNS if granularity == "request" else BUCKET_COLUMNS


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes (stored as UTC).
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def bucket_start(at: datetime, granularity: Granularity) -> datetime:
    at = _utc(at)
    if granularity == "hour":
        return at.replace(minute=0, second=0, microsecond=0)
    return at.replace(hour=0, minute=0, second=0, microsecond=0)


async def stream_usage(
    session: AsyncSession, query: UsageQuery, *, chunk: int = 1000
) -> AsyncIterator[dict[str, Any]]:
    """Rows of the export, in order: per request, or summed per bucket, tenant and model."""
    stmt = (
        select(UsageRecord, Tenant.name, Adapter.name, AdapterVersion.version)
        .join(Tenant, Tenant.id == UsageRecord.tenant_id)
        .outerjoin(AdapterVersion, AdapterVersion.id == UsageRecord.adapter_version_id)
        .outerjoin(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(UsageRecord.started_at >= query.start, UsageRecord.started_at < query.end)
        .order_by(UsageRecord.started_at, UsageRecord.request_id)
        .execution_options(yield_per=chunk)
    )
    if query.tenant_id is not None:
        stmt = stmt.where(UsageRecord.tenant_id == query.tenant_id)
    result = await session.stream(stmt)
    if query.granularity == "request":
        async for rec, tenant, adapter, version in result:
            yield _request_row(rec, tenant, adapter, version)
        return
    bucket: datetime | None = None
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    names: dict[tuple[str, str], set[str]] = {}

    def rows() -> list[dict[str, Any]]:
        return [{**groups[k], "model": ", ".join(sorted(names[k]))} for k in sorted(groups)]

    async for rec, tenant, adapter, _version in result:
        start = bucket_start(rec.started_at, query.granularity)
        if start != bucket:
            for row in rows():
                yield row
            bucket, groups, names = start, {}, {}
        key = (tenant, adapter or rec.model)
        g = groups.get(key)
        if g is None:
            g = groups[key] = {
                "period_start": start,
                "tenant": tenant,
                "tenant_id": str(rec.tenant_id),
                "adapter": key[1],
                "model": "",
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cached_tokens": 0,
                "cost_micros": 0,
            }
            names[key] = set()
        names[key].add(rec.model)
        g["requests"] += 1
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens", "cost_micros"):
            g[name] += getattr(rec, name)
    for row in rows():
        yield row


def _request_row(
    rec: UsageRecord, tenant: str, adapter: str | None, version: int | None
) -> dict[str, Any]:
    return {
        "request_id": rec.request_id,
        "tenant": tenant,
        "tenant_id": str(rec.tenant_id),
        "api_key_id": None if rec.api_key_id is None else str(rec.api_key_id),
        "adapter_version_id": None
        if rec.adapter_version_id is None
        else str(rec.adapter_version_id),
        "adapter": adapter,
        "adapter_version": version,
        "model": rec.model,
        "status": rec.status,
        "started_at": _utc(rec.started_at),
        "finished_at": _utc(rec.finished_at),
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "cached_tokens": rec.cached_tokens,
        "cost_micros": rec.cost_micros,
        "ttft_ms": rec.ttft_ms,
        "duration_ms": rec.duration_ms,
    }


@dataclass(frozen=True)
class UsageTotals:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_micros: int


async def usage_totals(
    session: AsyncSession,
    start: datetime,
    end: datetime,
    tenant_id: uuid.UUID | None = None,
) -> UsageTotals:
    """The ledger's sums over ``[start, end)``: what every export of the range must match."""
    stmt = select(
        func.count(UsageRecord.id),
        func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
        func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
        func.coalesce(func.sum(UsageRecord.cached_tokens), 0),
        func.coalesce(func.sum(UsageRecord.cost_micros), 0),
    ).where(UsageRecord.started_at >= start, UsageRecord.started_at < end)
    if tenant_id is not None:
        stmt = stmt.where(UsageRecord.tenant_id == tenant_id)
    row = (await session.execute(stmt)).one()
    return UsageTotals(*(int(v) for v in row))


@dataclass(frozen=True)
class ScopeTotals:
    tenant_id: uuid.UUID
    api_key_id: uuid.UUID | None
    tokens: int  # prompt + completion
    cost_micros: int


async def totals_by_key(session: AsyncSession, start: datetime, end: datetime) -> list[ScopeTotals]:
    """Tokens and cost per (tenant, key) over ``[start, end)``: what budgets are checked
    against, recomputed from the ledger."""
    stmt = (
        select(
            UsageRecord.tenant_id,
            UsageRecord.api_key_id,
            func.sum(UsageRecord.prompt_tokens + UsageRecord.completion_tokens),
            func.sum(UsageRecord.cost_micros),
        )
        .where(UsageRecord.started_at >= start, UsageRecord.started_at < end)
        .group_by(UsageRecord.tenant_id, UsageRecord.api_key_id)
    )
    rows = await session.execute(stmt)
    return [ScopeTotals(t, k, int(tok or 0), int(cost or 0)) for t, k, tok, cost in rows]
