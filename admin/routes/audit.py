"""The audit log of admin requests: read with filters and an id cursor, or export it whole
(CSV or JSON lines). Append-only through the API: no route changes or deletes a row.

``GET /admin/v1/audit?actor=&action=&target=&tenant=&outcome=&from=&to=&cursor=&limit=``
``GET /admin/v1/audit/export?format=csv|jsonl`` (the same filters)
``GET /admin/v1/me``: who the token is and its roles (for a console)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from loraplex.admin.audit_schemas import AuditEntryOut, AuditPage, MeOut
from loraplex.admin.auth import AuditDep, IdentityDep
from loraplex.gateway.deps import ServicesDep, SessionDep
from loraplex.gateway.openapi import download, errors
from loraplex.tenancy.admin_audit import (
    MEDIA_TYPES,
    AuditFormat,
    AuditQuery,
    audit_page,
    export_audit,
)
from loraplex.tenancy.errors import InvalidInput
from loraplex.tenancy.usage_service import parse_time

router = APIRouter(tags=["admin: audit"])

FromQ = Annotated[str | None, Query(alias="from", description="inclusive; date or ISO time")]
ToQ = Annotated[str | None, Query(description="exclusive; date or ISO time")]
OutcomeQ = Annotated[
    str | None, Query(description="ok (< 400), failed (>= 400), denied (401, 403), or a status")
]
TargetQ = Annotated[str | None, Query(description="a prefix of the target, e.g. tenants/acme")]


def _query(
    actor: str | None = None,
    action: str | None = None,
    target: TargetQ = None,
    tenant: str | None = None,
    outcome: OutcomeQ = None,
    start: FromQ = None,
    to: ToQ = None,
) -> AuditQuery:
    """The filters both routes take, as a dependency (query parameters)."""
    parsed: str | int | None = outcome
    if outcome is not None and outcome not in ("ok", "failed", "denied"):
        if not outcome.isdigit() or not 100 <= int(outcome) <= 599:
            raise InvalidInput("outcome is ok, failed, denied or an HTTP status", param="outcome")
        parsed = int(outcome)
    return AuditQuery(
        actor=actor,
        action=action,
        target=target,
        tenant=tenant,
        outcome=parsed,  # type: ignore[arg-type]
        start=parse_time(start, "from") if start else None,
        end=parse_time(to, "to") if to else None,
    )


QueryDep = Annotated[AuditQuery, Depends(_query)]


@router.get("/admin/v1/audit", responses=errors(401, 403, 503))
async def list_audit(
    _: AuditDep,
    session: SessionDep,
    query: QueryDep,
    cursor: Annotated[str | None, Query(description="next_cursor of the page before")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    if cursor is not None and not (cursor.isdigit() and len(cursor) <= 18):
        raise InvalidInput("cursor is the next_cursor of a page", param="cursor")
    rows, after = await audit_page(
        session, query, before_id=int(cursor) if cursor else None, limit=limit
    )
    return AuditPage(
        data=[AuditEntryOut.of(r) for r in rows],
        next_cursor=str(after) if after is not None else None,
    )


@router.get(
    "/admin/v1/audit/export",
    response_class=StreamingResponse,
    responses={200: download("The audit log, oldest first", MEDIA_TYPES), **errors(401, 403, 503)},
)
async def export_audit_log(
    _: AuditDep,
    services: ServicesDep,
    query: QueryDep,
    format: AuditFormat = "jsonl",
) -> StreamingResponse:
    body = await export_audit(services.sessions, query, format)
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%S}"
    return StreamingResponse(
        body,
        media_type=MEDIA_TYPES[format],
        headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.{format}"'},
    )


@router.get("/admin/v1/me", responses=errors(401, 503))
async def whoami(admin: IdentityDep) -> MeOut:
    return MeOut(
        actor=admin.actor,
        issuer=admin.issuer,
        roles=[str(r) for r in admin.roles],
        at=datetime.now(UTC),
    )
