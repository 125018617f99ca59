"""Usage export: the operator's (all tenants, or one) and a tenant's own (``usage:read``).

``GET /admin/v1/usage/export?from=&to=&tenant=&granularity=request|hour|day&format=csv|jsonl|parquet``
``GET /v1/usage?from=&to=&granularity=&format=`` (the caller's tenant only)
``GET /admin/v1/usage/series?from=&to=&tenant=&granularity=hour|day``: the same sums as JSON,
for charts (a read: not written to the audit log, which the console's polling would flood)

``from`` defaults to the start of the current month (UTC), ``to`` (exclusive) to now.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from loraplex.admin.auth import UsageDep
from loraplex.gateway.deps import ServicesDep, SessionDep, require_scope
from loraplex.gateway.openapi import download, errors
from loraplex.gateway.state import Services
from loraplex.tenancy.principal import Principal
from loraplex.tenancy.tenants import get_tenant
from loraplex.tenancy.usage_export import MEDIA_TYPES, Format, open_export
from loraplex.tenancy.usage_service import (
    Granularity,
    UsageQuery,
    month_start,
    parse_time,
    stream_usage,
)

router = APIRouter(tags=["usage"])

UsageReadDep = Annotated[Principal, Depends(require_scope("usage:read"))]
FromQ = Annotated[str | None, Query(alias="from", description="inclusive; date or ISO time")]
ToQ = Annotated[str | None, Query(description="exclusive; date or ISO time")]
_EXPORT = download("The export as a file, in `format`", MEDIA_TYPES, binary=("parquet",))


def _query(
    start: str | None,
    end: str | None,
    granularity: Granularity,
    tenant_id: uuid.UUID | None = None,
) -> UsageQuery:
    now = datetime.now(UTC)
    return UsageQuery(
        start=parse_time(start, "from") if start else month_start(now),
        end=parse_time(end, "to") if end else now,
        tenant_id=tenant_id,
        granularity=granularity,
    )


async def _respond(
    services: Services, query: UsageQuery, fmt: Format, name: str
) -> StreamingResponse:
    body = await open_export(services.sessions, query, fmt)
    stamp = f"{query.start:%Y%m%dT%H%M%S}-{query.end:%Y%m%dT%H%M%S}"
    filename = f"usage-{name}-{query.granularity}-{stamp}.{fmt}"
    return StreamingResponse(
        body,
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get(
    "/admin/v1/usage/export",
    response_class=StreamingResponse,
    responses={200: _EXPORT, **errors(401, 403, 404, 503)},
)
async def export_usage(
    _: UsageDep,
    services: ServicesDep,
    session: SessionDep,
    start: FromQ = None,
    to: ToQ = None,
    tenant: str | None = None,
    granularity: Granularity = "request",
    format: Format = "csv",
) -> StreamingResponse:
    tenant_id = (await get_tenant(session, tenant)).id if tenant else None
    query = _query(start, to, granularity, tenant_id)
    return await _respond(services, query, format, tenant or "all")


@router.get(
    "/v1/usage",
    response_class=StreamingResponse,
    responses={200: _EXPORT, **errors(401, 403, 503)},
)
async def own_usage(
    principal: UsageReadDep,
    services: ServicesDep,
    start: FromQ = None,
    to: ToQ = None,
    granularity: Granularity = "day",
    format: Format = "jsonl",
) -> StreamingResponse:
    query = _query(start, to, granularity, principal.tenant_id)
    return await _respond(services, query, format, principal.tenant_name)


SERIES_MAX_ROWS = 20_000


class UsageBucket(BaseModel):
    period_start: datetime
    tenant: str
    adapter: str  # the adapter, or the base model's name used
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_micros: int


class UsageSeries(BaseModel):
    granularity: Literal["hour", "day"]
    start: datetime
    end: datetime
    data: list[UsageBucket]  # oldest first; per period, tenant and adapter
    truncated: bool  # more than SERIES_MAX_ROWS rows: narrow the range


@router.get("/admin/v1/usage/series", responses=errors(400, 401, 403, 404, 503))
async def usage_series(
    _: UsageDep,
    session: SessionDep,
    start: FromQ = None,
    to: ToQ = None,
    tenant: str | None = None,
    granularity: Literal["hour", "day"] = "hour",
) -> UsageSeries:
    """Usage summed per hour or day, tenant and adapter; ``from`` defaults to 24 hours
    (hour) or 30 days (day) before ``to`` (default now)."""
    tenant_id = (await get_tenant(session, tenant)).id if tenant else None
    end = parse_time(to, "to") if to else datetime.now(UTC)
    back = timedelta(hours=24) if granularity == "hour" else timedelta(days=30)
    begin = parse_time(start, "from") if start else end - back
    query = UsageQuery(start=begin, end=end, tenant_id=tenant_id, granularity=granularity)
    rows: list[UsageBucket] = []
    truncated = False
    async for row in stream_usage(session, query):
        if len(rows) == SERIES_MAX_ROWS:
            truncated = True
            break
        rows.append(UsageBucket.model_validate(row))
    return UsageSeries(
        granularity=granularity, start=begin, end=end, data=rows, truncated=truncated
    )
