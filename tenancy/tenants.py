"""Tenant services: create, list, look up, update. Every change writes an audit row."""

from __future__ import annotations

import re
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from loraplex.tenancy.errors import Conflict, InvalidInput, NotFound
from loraplex.tenancy.limits import Limits
from loraplex.tenancy.models import AuditLog, Plan, Tenant

TenantStatus = Literal["active", "suspended"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")  # \Z: "$" passes a trailing newline


async def _plan_id(session: AsyncSession, plan: str | None) -> int | None:
    if plan is None:
        return None
    found = await session.scalar(select(Plan.id).where(Plan.name == plan))
    if found is None:
        raise NotFound(f"plan {plan!r} does not exist", param="plan")
    return found


def audit(
    session: AsyncSession,
    actor: str,
    action: str,
    *,
    tenant: Tenant | None,
    target: str,
    detail: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditLog(
            actor=actor,
            action=action,
            tenant_id=tenant.id if tenant is not None else None,
            target=target,
            detail=detail or {},
        )
    )


async def get_tenant(session: AsyncSession, name: str) -> Tenant:
    tenant = await session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound(f"tenant {name!r} does not exist", param="name")
    return tenant


async def list_tenants(session: AsyncSession) -> list[Tenant]:
    return list((await session.scalars(select(Tenant).order_by(Tenant.name))).all())


async def create_tenant(
    session: AsyncSession,
    *,
    name: str,
    actor: str,
    plan: str | None = None,
    limits: dict[str, Any] | None = None,
) -> Tenant:
    if not _NAME.match(name):
        raise InvalidInput(
            "tenant name must be 1-64 characters of a-z, 0-9, '-' or '_', starting with a "
            "letter or digit",
            param="name",
        )
    tenant = Tenant(
        name=name,
        plan_id=await _plan_id(session, plan),
        limits=Limits.parse(limits or {}).to_json(),
    )
    session.add(tenant)
    try:
        await session.flush()
    except IntegrityError:
        await session.rollback()
        raise Conflict(f"tenant {name!r} already exists", param="name") from None
    audit(session, actor, "tenant.create", tenant=tenant, target=name, detail={"plan": plan})
    await session.commit()
    await session.refresh(tenant)
    return tenant


async def update_tenant(
    session: AsyncSession,
    name: str,
    *,
    actor: str,
    status: TenantStatus | None = None,
    limits: dict[str, Any] | None = None,
    plan: str | None = None,
    clear_plan: bool = False,
) -> Tenant:
    """Changes only what is given. ``limits`` merges into the tenant's limits (a field set
    to ``None`` is removed; the fields not named are kept)."""
    tenant = await get_tenant(session, name)
    changes: dict[str, Any] = {}
    if status is not None and status != tenant.status:
        tenant.status = status
        changes["status"] = status
    if limits is not None:
        tenant.limits = Limits.merge(tenant.limits or {}, limits).to_json()
        changes["limits"] = limits
    if plan is not None or clear_plan:
        tenant.plan_id = await _plan_id(session, plan)
        changes["plan"] = plan
    if changes:
        audit(session, actor, "tenant.update", tenant=tenant, target=name, detail=changes)
        await session.commit()
        await session.refresh(tenant)
    return tenant
