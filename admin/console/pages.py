"""The console's pages: read through the same services and role checks as the admin API
(``admin.roles``); what a page may change is rendered only for roles allowed to, and the
change itself goes to the admin REST API (``static/console.js``), which checks again."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response

from loraplex.admin.console.session import ConsoleSession, read_session
from loraplex.admin.roles import Perm, allowed
from loraplex.gateway.deps import ServicesDep, SessionDep
from loraplex.gateway.state import Services
from loraplex.tenancy import api_keys, tenants
from loraplex.tenancy.admin_audit import AuditQuery, audit_page
from loraplex.tenancy.errors import DomainError, NotFound
from loraplex.tenancy.models import Tenant
from loraplex.tenancy.principal import SCOPES

router = APIRouter(prefix="/console", include_in_schema=False)
LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent",
    "monthly_token_budget",
    "monthly_spend_budget_micros",
)


class LoginNeeded(Exception):
    pass


async def current_session(request: Request, services: ServicesDep) -> ConsoleSession:
    settings = services.settings
    session = read_session(request, settings.resolved_secret_key())
    if session is None or (session.via == "token" and not settings.admin_token_enabled):
        raise LoginNeeded
    return session


SessionCookieDep = Annotated[ConsoleSession, Depends(current_session)]


def can(session: ConsoleSession, perm: Perm, tenant: str | None = None) -> bool:
    return allowed(session.roles, perm, tenant)


def render(
    request: Request,
    session: ConsoleSession,
    template: str,
    status: int = 200,
    **context: Any,
) -> Response:
    templates = request.app.state.console_templates
    response: Response = templates.TemplateResponse(
        request,
        template,
        {
            "session": session,
            "global_read": can(session, Perm.READ),
            "can_audit": can(session, Perm.AUDIT),
            "Perm": Perm,
            "can": lambda perm, tenant=None: can(session, perm, tenant),
            **context,
        },
        status_code=status,
    )
    return response


def refused(request: Request, session: ConsoleSession, message: str, status: int = 403) -> Response:
    return render(request, session, "error.html", status=status, message=message)


async def visible_tenants(db: Any, session: ConsoleSession) -> list[Tenant]:
    """All tenants for a global reader; a tenant admin's own tenants otherwise."""
    if can(session, Perm.READ):
        return list(await tenants.list_tenants(db))
    found = []
    for role in session.roles:
        if role.tenant is not None:
            try:
                found.append(await tenants.get_tenant(db, role.tenant))
            except NotFound:
                pass
    return found


@router.get("", name="console_home")
@router.get("/", include_in_schema=False)
async def home() -> Response:
    return RedirectResponse("/console/tenants", status_code=303)


@router.get("/tenants")
async def tenant_list(request: Request, session: SessionCookieDep, db: SessionDep) -> Response:
    rows = await visible_tenants(db, session)
    return render(
        request,
        session,
        "tenants.html",
        tenants=rows,
        can_create=can(session, Perm.MANAGE_TENANTS),
        limit_fields=LIMIT_FIELDS,
    )


async def _residency(services: Services) -> tuple[dict[str, str], str]:
    """Adapter key -> where the engine(s) hold it; and a note when that is unknown."""
    engine = services.engine
    if engine is None:
        return {}, "no engine is attached to this server"
    try:
        res = await asyncio.wait_for(engine.adapter_residency(), 2.0)
    except Exception as exc:  # an engine down is shown, not raised
        return {}, f"the engine did not answer ({type(exc).__name__})"
    where: dict[str, str] = {}
    for key in res.loading:
        where[key] = "loading"
    for key in res.host:
        where[key] = "host"
    for key in res.gpu:
        where[key] = "GPU"
    return where, ""


@router.get("/tenants/{name}")
async def tenant_page(
    name: str, request: Request, session: SessionCookieDep, db: SessionDep, services: ServicesDep
) -> Response:
    if not can(session, Perm.READ, name):
        return refused(request, session, f"Your roles do not allow reading tenant {name!r}.")
    try:
        tenant = await tenants.get_tenant(db, name)
    except DomainError as exc:
        return refused(request, session, exc.message, status=404)
    keys = await api_keys.list_keys(db, name)
    adapters = []
    if services.adapters is not None:
        adapters = await services.adapters.registry.list(tenant.id)
    where, residency_note = await _residency(services)
    return render(
        request,
        session,
        "tenant.html",
        tenant=tenant,
        keys=keys,
        adapters=adapters,
        where=where,
        residency_note=residency_note,
        limit_fields=LIMIT_FIELDS,
        scopes=SCOPES,
        can_edit=can(session, Perm.MANAGE_TENANTS, name),
        can_keys=can(session, Perm.MANAGE_KEYS, name),
        can_adapters=can(session, Perm.MANAGE_ADAPTERS, name) and services.adapters is not None,
    )


@router.get("/usage")
async def usage_page(
    request: Request, session: SessionCookieDep, db: SessionDep, tenant: str = ""
) -> Response:
    rows = await visible_tenants(db, session)
    names = [t.name for t in rows]
    if not can(session, Perm.USAGE, None) and not tenant and names:
        tenant = names[0]  # a tenant admin sees its own tenant's usage
    if tenant and not can(session, Perm.USAGE, tenant):
        return refused(request, session, f"Your roles do not allow usage of {tenant!r}.")
    return render(request, session, "usage.html", tenants=names, tenant=tenant)


@router.get("/audit")
async def audit_log_page(
    request: Request,
    session: SessionCookieDep,
    db: SessionDep,
    actor: str = "",
    action: str = "",
    tenant: str = "",
    outcome: str = "",
    cursor: Annotated[str, Query(max_length=18)] = "",
) -> Response:
    if not can(session, Perm.AUDIT):
        return refused(request, session, "Your roles do not allow reading the audit log.")
    parsed: Any = None
    if outcome in ("ok", "failed", "denied"):
        parsed = outcome
    elif outcome.isdigit() and 100 <= int(outcome) <= 599:
        parsed = int(outcome)
    query = AuditQuery(
        actor=actor or None, action=action or None, tenant=tenant or None, outcome=parsed
    )
    before = int(cursor) if cursor.isdigit() else None
    rows, after = await audit_page(db, query, before_id=before, limit=50)
    filters = {"actor": actor, "action": action, "tenant": tenant, "outcome": outcome}
    next_url = None
    if after is not None:
        q = "&".join(f"{k}={quote(v)}" for k, v in filters.items() if v)
        next_url = f"/console/audit?{q}{'&' if q else ''}cursor={after}"
    return render(request, session, "audit.html", rows=rows, filters=filters, next_url=next_url)


@router.get("/engines")
async def engines_page(
    request: Request, session: SessionCookieDep, services: ServicesDep
) -> Response:
    if not can(session, Perm.READ):
        return refused(request, session, "Your roles do not allow reading the engines' health.")
    engine = services.engine
    context: dict[str, Any] = {"engine": None, "replicas": [], "stats": None, "info": None}
    if engine is not None:
        from loraplex.gateway.routed_client import RoutedEngineClient

        context.update(
            engine=engine.health(),
            stats=engine.stats(),
            info=engine.model_info(),
            replicas=engine.replicas() if isinstance(engine, RoutedEngineClient) else [],
        )
    return render(request, session, "engines.html", **context)
