"""Reading the admin audit trail (``admin_audit``): filtered pages, newest first, with an
id cursor; and the whole filtered trail, oldest first, as CSV or JSON lines. Read only:
rows are appended by ``admin.audit`` and never changed through the API."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.tenancy.models import AdminAuditEntry

AuditFormat = Literal["csv", "jsonl"]
MEDIA_TYPES: dict[str, str] = {"csv": "text/csv", "jsonl": "application/x-ndjson"}
COLUMNS = (
    "id",
    "at",
    "actor",
    "issuer",
    "action",
    "method",
    "target",
    "tenant",
    "outcome",
    "reason",
    "source",
    "request_id",
)
Outcome = Literal["ok", "failed", "denied"]
_BATCH = 1000


@dataclass(frozen=True)
class AuditQuery:
    actor: str | None = None
    action: str | None = None
    target: str | None = None  # a prefix of the target ("tenants/acme" finds its keys too)
    tenant: str | None = None
    outcome: Outcome | int | None = None  # ok: < 400; failed: >= 400; denied: 401 or 403
    start: datetime | None = None  # inclusive
    end: datetime | None = None  # exclusive


def _filtered(q: AuditQuery) -> Select[AdminAuditEntry]:
    stmt = select(AdminAuditEntry)
    t = AdminAuditEntry
    if q.actor is not None:
        stmt = stmt.where(t.actor == q.actor)
    if q.action is not None:
        stmt = stmt.where(t.action == q.action)
    if q.target is not None:
        stmt = stmt.where(t.target.startswith(q.target, autoescape=True))
    if q.tenant is not None:
        stmt = stmt.where(t.tenant == q.tenant)
    if q.outcome == "ok":
        stmt = stmt.where(t.outcome < 400)
    elif q.outcome == "failed":
        stmt = stmt.where(t.outcome >= 400)
    elif q.outcome == "denied":
        stmt = stmt.where(t.outcome.in_((401, 403)))
    elif isinstance(q.outcome, int):
        stmt = stmt.where(t.outcome == q.outcome)
    if q.start is not None:
        stmt = stmt.where(t.at >= q.start)
    if q.end is not None:
        stmt = stmt.where(t.at < q.end)
    return stmt


async def audit_page(
    session: AsyncSession, q: AuditQuery, *, before_id: int | None, limit: int
) -> tuple[list[AdminAuditEntry], int | None]:
    """Up to ``limit`` rows older than ``before_id``, newest first; and the cursor of the
    next page (None: this was the last)."""
    stmt = _filtered(q)
    if before_id is not None:
        stmt = stmt.where(AdminAuditEntry.id < before_id)
    rows = list(
        (await session.scalars(stmt.order_by(AdminAuditEntry.id.desc()).limit(limit + 1))).all()
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


def as_dict(row: AdminAuditEntry) -> dict[str, Any]:
    at = row.at.replace(tzinfo=UTC) if row.at.tzinfo is None else row.at.astimezone(UTC)
    values = {c: getattr(row, c) for c in COLUMNS}
    values["at"] = at.isoformat()
    return values


async def _rows(
    sessions: async_sessionmaker[AsyncSession], q: AuditQuery
) -> AsyncIterator[list[AdminAuditEntry]]:
    after = 0
    while True:
        async with sessions() as session:
            stmt = _filtered(q).where(AdminAuditEntry.id > after)
            batch = list(
                (await session.scalars(stmt.order_by(AdminAuditEntry.id).limit(_BATCH))).all()
            )
        if not batch:
            return
        yield batch
        after = batch[-1].id


def _csv_line(values: list[Any]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(["" if v is None else v for v in values])
    return out.getvalue().encode()


async def export_audit(
    sessions: async_sessionmaker[AsyncSession], q: AuditQuery, fmt: AuditFormat
) -> AsyncIterator[bytes]:
    """The filtered trail, oldest first. The first batch is read before this returns, so a
    database that is down is an error response rather than a 200 cut off."""
    batches = _rows(sessions, q)
    first: list[AdminAuditEntry] = await anext(batches, [])

    async def body() -> AsyncIterator[bytes]:
        if fmt == "csv":
            yield _csv_line(list(COLUMNS))
        batch = first
        while batch:
            if fmt == "csv":
                yield b"".join(_csv_line(list(as_dict(r).values())) for r in batch)
            else:
                yield b"".join(json.dumps(as_dict(r)).encode() + b"\n" for r in batch)
            batch = await anext(batches, [])

    return body()
