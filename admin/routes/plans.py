"""Plans: create, list, show, update prices and limits. A tenant is put on a plan with
``PATCH /admin/v1/tenants/{name}`` (``{"plan": "pro"}``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from admin.auth import AdminDep
from gateway.deps import SessionDep
from tenancy import plans
from tenancy.models import Plan

router = APIRouter(prefix="/admin/v1/plans", tags=["admin: plans"])


class PlanCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    prompt_price_micros: int = Field(0, description="per million prompt tokens")
    completion_price_micros: int = Field(0, description="per million completion tokens")
    limits: dict[str, Any] = Field(default_factory=dict)


class PlanUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_price_micros: int | None = None
    completion_price_micros: int | None = None
    limits: dict[str, Any] | None = None


class PlanOut(BaseModel):
    object: Literal["plan"] = "plan"
    name: str
    prompt_price_micros: int
    completion_price_micros: int
    limits: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, p: Plan) -> PlanOut:
        return cls(
            name=p.name,
            prompt_price_micros=p.prompt_price_micros,
            completion_price_micros=p.completion_price_micros,
            limits=p.limits,
            created_at=p.created_at,
        )


class PlanList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PlanOut]


@router.post("", status_code=201)
async def create_plan(body: PlanCreate, admin: AdminDep, session: SessionDep) -> PlanOut:
    plan = await plans.create_plan(session, actor=admin.actor, **body.model_dump())
    return PlanOut.of(plan)


@router.get("")
async def list_plans(_: AdminDep, session: SessionDep) -> PlanList:
    return PlanList(data=[PlanOut.of(p) for p in await plans.list_plans(session)])


@router.get("/{name}")
async def get_plan(name: str, _: AdminDep, session: SessionDep) -> PlanOut:
    return PlanOut.of(await plans.get_plan(session, name))


@router.patch("/{name}")
async def update_plan(name: str, body: PlanUpdate, admin: AdminDep, session: SessionDep) -> PlanOut:
    plan = await plans.update_plan(
        session, name, actor=admin.actor, **body.model_dump(exclude_unset=True)
    )
    return PlanOut.of(plan)
