"""`loraplex admin ...`: operator commands for tenants and API keys, over the admin REST API."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from typer.core import TyperGroup


class JsonAnywhere(TyperGroup):
    """``--json`` is the admin group's option, but a user types it anywhere on the line
    (``loraplex admin key list acme --json``): it is moved in front of the subcommand."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        if "--json" in args[:end]:
            head = [a for a in args[:end] if a != "--json"]
            args = ["--json", *head, *args[end:]]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=JsonAnywhere,
    help="Operate tenants, API keys, plans and adapters over the admin REST API.",
    no_args_is_help=True,
)
tenant_app = typer.Typer(help="Tenants: create, list, update.", no_args_is_help=True)
key_app = typer.Typer(
    help="A tenant's API keys: create, list, revoke, rotate.", no_args_is_help=True
)
app.add_typer(tenant_app, name="tenant")
app.add_typer(key_app, name="key")

out = Console()
err = Console(stderr=True)


@dataclass(frozen=True)
class Remote:
    url: str
    token: str | None
    as_json: bool

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            with httpx.Client(base_url=self.url, headers=headers, timeout=30.0) as client:
                response = client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            err.print(f"[red]cannot reach {self.url}: {exc}[/red]")
            raise typer.Exit(2) from None
        exit_on_error(response)
        return response.json()


def exit_on_error(response: httpx.Response) -> None:
    """Print the API's error envelope message in one line and exit 1 on a 4xx/5xx."""
    if not response.is_error:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    err.print(f"[red]error {response.status_code}: {message}[/red]")
    raise typer.Exit(1)


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option(envvar="LORAPLEX_URL", help="The loraplex server's base URL.")
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        str | None, typer.Option(envvar="LORAPLEX_ADMIN_TOKEN", help="The admin token.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print raw JSON (anywhere on the command line).")
    ] = False,
) -> None:
    ctx.obj = Remote(url=url.rstrip("/"), token=token, as_json=as_json)


def _limits(pairs: list[str] | None) -> dict[str, int | None] | None:
    """``--limit requests_per_minute=60`` (``=none`` clears one)."""
    if not pairs:
        return None
    limits: dict[str, int | None] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint="--limit")
        try:
            limits[name] = None if value.lower() in {"none", "null", ""} else int(value)
        except ValueError:
            raise typer.BadParameter(f"{name}: not an integer", param_hint="--limit") from None
    return limits


def _cell(value: Any) -> str:
    """A table cell: times to the second (``2026-12-03 10:32:36``), lists comma-joined,
    limits as ``name=value``."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, str) and len(value) >= 19 and value[10:11] == "T" and value[4] == "-":
        return value[:10] + " " + value[11:19]
    return str(value)


def _show(remote: Remote, data: Any, columns: list[str], title: str) -> None:
    """A table; when it is wider than the terminal, one ``column: value`` block per row
    instead, so that no value (an id a user copies) is ever cut."""
    if remote.as_json:
        out.print_json(json.dumps(data))
        return
    rows = data["data"] if isinstance(data, dict) and "data" in data else [data]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    table = Table(title=title)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row_cells in cells:
        table.add_row(*row_cells)
    natural = Measurement.get(out, out.options.update_width(100_000), table).maximum
    if natural <= out.width:
        out.print(table)
        return
    out.print(f"[bold]{title}[/bold]" if title else "")
    pad = max(len(c) for c in columns) + 2
    for row_cells in cells:
        out.print()
        for column, value in zip(columns, row_cells, strict=True):
            out.print(f"  {column:<{pad}}{value}", markup=False, highlight=False, soft_wrap=True)


TENANT_COLUMNS = ["name", "status", "plan", "limits", "created_at"]
KEY_COLUMNS = ["id", "prefix", "name", "scopes", "expires_at", "revoked_at", "last_used_at"]
LimitOpt = Annotated[
    list[str] | None, typer.Option("--limit", help="NAME=VALUE, e.g. requests_per_minute=60.")
]


@tenant_app.command("create")
def tenant_create(
    ctx: typer.Context,
    name: str,
    plan: Annotated[str | None, typer.Option(help="Plan name.")] = None,
    limit: LimitOpt = None,
) -> None:
    body: dict[str, Any] = {"name": name, "plan": plan, "limits": _limits(limit) or {}}
    _show(ctx.obj, ctx.obj.call("POST", "/admin/v1/tenants", body), TENANT_COLUMNS, "tenant")


@tenant_app.command("list")
def tenant_list(ctx: typer.Context) -> None:
    _show(ctx.obj, ctx.obj.call("GET", "/admin/v1/tenants"), TENANT_COLUMNS, "tenants")


@tenant_app.command("update")
def tenant_update(
    ctx: typer.Context,
    name: str,
    status: Annotated[str | None, typer.Option(help="active or suspended.")] = None,
    plan: Annotated[str | None, typer.Option(help="Plan name.")] = None,
    no_plan: Annotated[bool, typer.Option("--no-plan", help="Remove the plan.")] = False,
    limit: LimitOpt = None,
) -> None:
    """Change what is given. --limit merges into the tenant's limits: the limits named are
    set (NAME=none removes one), the others are kept."""
    body: dict[str, Any] = {}
    if status is not None:
        body["status"] = status
    if plan is not None or no_plan:
        body["plan"] = plan
    limits = _limits(limit)
    if limits is not None:
        body["limits"] = limits
    data = ctx.obj.call("PATCH", f"/admin/v1/tenants/{name}", body)
    _show(ctx.obj, data, TENANT_COLUMNS, "tenant")


def _print_issued(remote: Remote, data: dict[str, Any]) -> None:
    if remote.as_json:
        out.print_json(json.dumps(data))
        return
    scopes = ",".join(data["scopes"])
    out.print(f"key id: {data['id']}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"prefix: {data['prefix']}  scopes: {scopes}", markup=False, highlight=False)
    out.print("[bold]Store this key now; it is not shown again:[/bold]")
    out.print(data["key"], markup=False, highlight=False, soft_wrap=True)


@key_app.command("create")
def key_create(
    ctx: typer.Context,
    tenant: str,
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help="Repeat for several (default inference).")
    ] = None,
    expires_at: Annotated[
        datetime | None,
        typer.Option(formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z"], help="With offset."),
    ] = None,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    limit: LimitOpt = None,
) -> None:
    body: dict[str, Any] = {"name": name, "scopes": scope or ["inference"]}
    if expires_at is not None:
        body["expires_at"] = expires_at.isoformat()
    if limit:
        body["limits"] = {k: v for k, v in (_limits(limit) or {}).items() if v is not None}
    _print_issued(ctx.obj, ctx.obj.call("POST", f"/admin/v1/tenants/{tenant}/keys", body))


@key_app.command("list")
def key_list(ctx: typer.Context, tenant: str) -> None:
    data = ctx.obj.call("GET", f"/admin/v1/tenants/{tenant}/keys")
    _show(ctx.obj, data, KEY_COLUMNS, f"keys of {tenant}")


def resolve_key_id(remote: Remote, tenant: str, given: str) -> str:
    """A key's full id from a unique start of it (``b2ac``), as ``git`` takes commits."""
    wanted = given.strip().lower()
    if len(wanted) == 36:
        return wanted
    keys = remote.call("GET", f"/admin/v1/tenants/{tenant}/keys")["data"]
    found = [k["id"] for k in keys if k["id"].lower().startswith(wanted)] if wanted else []
    if len(found) == 1:
        return str(found[0])
    what = "no key of" if not found else f"{len(found)} keys of"
    err.print(f"[red]error: {what} tenant {tenant!r} has an id starting {given!r}[/red]")
    raise typer.Exit(1)


KeyId = Annotated[str, typer.Argument(help="The key's id, or a unique start of it.")]


@key_app.command("revoke")
def key_revoke(ctx: typer.Context, tenant: str, key_id: KeyId) -> None:
    key_id = resolve_key_id(ctx.obj, tenant, key_id)
    data = ctx.obj.call("DELETE", f"/admin/v1/tenants/{tenant}/keys/{key_id}")
    _show(ctx.obj, data, KEY_COLUMNS, "revoked")


@key_app.command("rotate")
def key_rotate(ctx: typer.Context, tenant: str, key_id: KeyId) -> None:
    """Issue a replacement (same scopes, limits, expiry) and revoke the old key."""
    key_id = resolve_key_id(ctx.obj, tenant, key_id)
    _print_issued(ctx.obj, ctx.obj.call("POST", f"/admin/v1/tenants/{tenant}/keys/{key_id}/rotate"))
