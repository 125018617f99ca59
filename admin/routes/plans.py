"""Plans: create, list, show, update prices and limits. A tenant is put on a plan with
``PATCH /admin/v1/tenants/{name}`` (``{"plan": "pro"}``)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from loraplex.admin.auth import ManagePlansDep, ReadDep
from loraplex.admin.schemas import PlanCreate, PlanList, PlanOut, PlanUpdate
from loraplex.gateway.deps import SessionDep
from loraplex.gateway.json_body import StrictJsonRoute
from loraplex.gateway.openapi import errors
from loraplex.tenancy import plans

router = APIRouter(prefix="/admin/v1/plans", tags=["admin: plans"], route_class=StrictJsonRoute)


@router.post("", status_code=201, responses=errors(401, 403, 409, 415, 503))
async def create_plan(
    body: PlanCreate, admin: ManagePlansDep, session: SessionDep, request: Request
) -> PlanOut:
    request.state.audit_target = body.name
    plan = await plans.create_plan(session, actor=admin.audit_actor, **body.model_dump())
    return PlanOut.of(plan)


@router.get("", responses=errors(401, 403, 503))
async def list_plans(_: ReadDep, session: SessionDep) -> PlanList:
    return PlanList(data=[PlanOut.of(p) for p in await plans.list_plans(session)])


@router.get("/{name}", responses=errors(401, 403, 404, 503))
async def get_plan(name: str, _: ReadDep, session: SessionDep) -> PlanOut:
    return PlanOut.of(await plans.get_plan(session, name))


@router.patch("/{name}", responses=errors(401, 403, 404, 415, 503))
async def update_plan(
    name: str, body: PlanUpdate, admin: ManagePlansDep, session: SessionDep
) -> PlanOut:
    plan = await plans.update_plan(
        session, name, actor=admin.audit_actor, **body.model_dump(exclude_unset=True)
    )
    return PlanOut.of(plan)
