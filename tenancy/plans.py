"""Plans: named prices (micro-units per million tokens) and default limits for tenants.

A tenant on a plan is billed at the plan's prices (``Principal`` carries them; the cost
of each request is computed once, when it is metered) and limited by the plan's limits
under its own (``tenancy.limits.effective_tenant_limits``). A price change applies to
requests metered after it; the ledger keeps each request's cost as computed then.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from loraplex.tenancy.errors import Conflict, InvalidInput, NotFound
from loraplex.tenancy.limits import MAX_LIMIT, Limits
from loraplex.tenancy.models import Plan
from loraplex.tenancy.tenants import audit

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}\Z")  # \Z: "$" passes a trailing newline


def _price(value: int, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
        raise InvalidInput(f"{param} must be a whole number of micro-units, 0 or more", param=param)
    return value


async def get_plan(session: AsyncSession, name: str) -> Plan:
    plan = await session.scalar(select(Plan).where(Plan.name == name))
    if plan is None:
        raise NotFound(f"plan {name!r} does not exist", param="name")
    return plan


async def list_plans(session: AsyncSession) -> list[Plan]:
    return list((await session.scalars(select(Plan).order_by(Plan.name))).all())


async def create_plan(
    session: AsyncSession,
    *,
    name: str,
    actor: str,
    prompt_price_micros: int = 0,
    completion_price_micros: int = 0,
    limits: dict[str, Any] | None = None,
) -> Plan:
    if not _NAME.match(name):
        raise InvalidInput(
            "plan name must be 1-64 characters of a-z, 0-9, '.', '-' or '_'", param="name"
        )
    plan = Plan(
        name=name,
        prompt_price_micros=_price(prompt_price_micros, "prompt_price_micros"),
        completion_price_micros=_price(completion_price_micros, "completion_price_micros"),
        limits=Limits.parse(limits, param="limits").to_json(),
    )
    session.add(plan)
    try:
        await session.flush()
    except IntegrityError:
        await session.rollback()
        raise Conflict(f"plan {name!r} already exists", param="name") from None
    audit(session, actor, "plan.create", tenant=None, target=name, detail=_detail(plan))
    await session.commit()
    return plan


async def update_plan(
    session: AsyncSession,
    name: str,
    *,
    actor: str,
    prompt_price_micros: int | None = None,
    completion_price_micros: int | None = None,
    limits: dict[str, Any] | None = None,
) -> Plan:
    """Changes only what is given; ``limits`` merges into the plan's limits (a field set to
    ``None`` is removed; the fields not named are kept)."""
    plan = await get_plan(session, name)
    if prompt_price_micros is not None:
        plan.prompt_price_micros = _price(prompt_price_micros, "prompt_price_micros")
    if completion_price_micros is not None:
        plan.completion_price_micros = _price(completion_price_micros, "completion_price_micros")
    if limits is not None:
        plan.limits = Limits.merge(plan.limits or {}, limits, param="limits").to_json()
    audit(session, actor, "plan.update", tenant=None, target=name, detail=_detail(plan))
    await session.commit()
    return plan


def _detail(plan: Plan) -> dict[str, Any]:
    return {
        "prompt_price_micros": plan.prompt_price_micros,
        "completion_price_micros": plan.completion_price_micros,
        "limits": plan.limits,
    }
