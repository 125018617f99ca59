"""`loraplex admin plan ...`: plans (prices and default limits), over the admin REST API.

A tenant is put on a plan with ``loraplex admin tenant update NAME --plan PLAN``.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from loraplex.admin_cli import LimitOpt, _limits, _show

plan_app = typer.Typer(
    help="Plans: prices per million tokens and default limits (create, list, show, update).",
    no_args_is_help=True,
)
PLAN_COLUMNS = ["name", "prompt_price_micros", "completion_price_micros", "limits", "created_at"]
PriceOpt = Annotated[
    int | None,
    typer.Option(min=0, help="Micro-units (1e-6 of the currency) per million tokens."),
]


@plan_app.command("create")
def plan_create(
    ctx: typer.Context,
    name: str,
    prompt_price: Annotated[
        int, typer.Option(min=0, help="Micro-units per million prompt tokens.")
    ] = 0,
    completion_price: Annotated[
        int, typer.Option(min=0, help="Micro-units per million completion tokens.")
    ] = 0,
    limit: LimitOpt = None,
) -> None:
    body: dict[str, Any] = {
        "name": name,
        "prompt_price_micros": prompt_price,
        "completion_price_micros": completion_price,
        "limits": {k: v for k, v in (_limits(limit) or {}).items() if v is not None},
    }
    _show(ctx.obj, ctx.obj.call("POST", "/admin/v1/plans", body), PLAN_COLUMNS, "plan")


@plan_app.command("list")
def plan_list(ctx: typer.Context) -> None:
    _show(ctx.obj, ctx.obj.call("GET", "/admin/v1/plans"), PLAN_COLUMNS, "plans")


@plan_app.command("show")
def plan_show(ctx: typer.Context, name: str) -> None:
    _show(ctx.obj, ctx.obj.call("GET", f"/admin/v1/plans/{name}"), PLAN_COLUMNS, "plan")


@plan_app.command("update")
def plan_update(
    ctx: typer.Context,
    name: str,
    prompt_price: PriceOpt = None,
    completion_price: PriceOpt = None,
    limit: LimitOpt = None,
) -> None:
    """Change what is given. --limit merges into the plan's limits: the limits named are
    set (NAME=none removes one), the others are kept. Applies to requests metered after it."""
    body: dict[str, Any] = {}
    if prompt_price is not None:
        body["prompt_price_micros"] = prompt_price
    if completion_price is not None:
        body["completion_price_micros"] = completion_price
    limits = _limits(limit)
    if limits is not None:
        body["limits"] = limits
    _show(ctx.obj, ctx.obj.call("PATCH", f"/admin/v1/plans/{name}", body), PLAN_COLUMNS, "plan")
