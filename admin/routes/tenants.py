"""Tenants: create, list, show, update (status, limits, plan)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from loraplex.admin.auth import ManageTenantsDep, ReadDep, TenantReadDep
from loraplex.admin.schemas import TenantCreate, TenantList, TenantOut, TenantUpdate
from loraplex.gateway.deps import AuthDep, SessionDep
from loraplex.gateway.json_body import StrictJsonRoute
from loraplex.gateway.openapi import errors
from loraplex.tenancy import tenants

router = APIRouter(prefix="/admin/v1/tenants", tags=["admin: tenants"], route_class=StrictJsonRoute)


@router.post("", status_code=201, responses=errors(401, 403, 404, 409, 415, 503))
async def create_tenant(
    body: TenantCreate, admin: ManageTenantsDep, session: SessionDep, request: Request
) -> TenantOut:
    request.state.audit_target = request.state.audit_tenant = body.name
    tenant = await tenants.create_tenant(
        session, name=body.name, plan=body.plan, limits=body.limits, actor=admin.audit_actor
    )
    return TenantOut.of(tenant)


@router.get("", responses=errors(401, 403, 503))
async def list_tenants(_: ReadDep, session: SessionDep) -> TenantList:
    return TenantList(data=[TenantOut.of(t) for t in await tenants.list_tenants(session)])


@router.get("/{name}", responses=errors(401, 403, 404, 503))
async def get_tenant(name: str, _: TenantReadDep, session: SessionDep) -> TenantOut:
    return TenantOut.of(await tenants.get_tenant(session, name))


@router.patch("/{name}", responses=errors(401, 403, 404, 415, 503))
async def update_tenant(
    name: str, body: TenantUpdate, admin: ManageTenantsDep, auth: AuthDep, session: SessionDep
) -> TenantOut:
    tenant = await tenants.update_tenant(
        session,
        name,
        actor=admin.audit_actor,
        status=body.status,
        limits=body.limits,
        plan=body.plan,
        clear_plan="plan" in body.model_fields_set and body.plan is None,
    )
    auth.forget_tenant(tenant.id)  # this replica at once; the others within the cache TTL
    return TenantOut.of(tenant)
