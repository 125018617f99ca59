"""The admin audit trail: one ``admin_audit`` row per admin request that changes something,
is refused (401, 403), or exports data; successful reads are not written (a console polls).

An ASGI middleware around the admin routes: after the response it writes who
(``request.state.admin``, set by ``admin.auth``; else ``anonymous``), the route's action name,
the target (the path below ``/admin/v1/``, never the query string or the body), the tenant,
the HTTP status, why a call was refused (a short code, never what was sent), the client's
address and the request id. The row is written in a transaction of its own once the status
is known and before the response starts (so a client reading the log next finds it); a
database outage loses rows (logged), never the response.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.tenancy.models import AdminAuditEntry

if TYPE_CHECKING:
    from loraplex.gateway.state import Services

log = logging.getLogger("loraplex.admin.audit")

PREFIX = "/admin/"
EXPORTS = frozenset({"export_usage", "export_audit_log"})
_READS = frozenset({"GET", "HEAD"})


def _cut(value: str, n: int) -> str:
    return value if len(value) <= n else value[: n - 1] + "…"


def _tenant(route_path: str, path_params: dict[str, Any], state: dict[str, Any]) -> str | None:
    if "tenant" in path_params:
        return str(path_params["tenant"])
    if route_path.startswith("/admin/v1/tenants/{name}"):
        return str(path_params.get("name"))
    tenant = state.get("audit_tenant")
    return str(tenant) if tenant else None


def entry_for(scope: Scope, status: int) -> AdminAuditEntry | None:
    """The row for one answered request, or None when it is not audited."""
    route = scope.get("route")
    if route is None:
        return None  # no such admin route: nothing was attempted
    action = str(getattr(route, "name", "unknown"))
    method = str(scope["method"])
    if method in _READS and status not in (401, 403) and action not in EXPORTS:
        return None
    state: dict[str, Any] = scope.get("state", {})
    admin = state.get("admin")
    target = scope["path"].removeprefix("/admin/v1/")
    if state.get("audit_target"):
        target = f"{target}/{state['audit_target']}"
    client = scope.get("client")
    return AdminAuditEntry(
        actor=_cut(admin.actor if admin is not None else "anonymous", 256),
        issuer=_cut(admin.issuer if admin is not None else "", 512),
        action=_cut(action, 64),
        method=method[:8],
        target=_cut(target, 512),
        tenant=_tenant(str(getattr(route, "path", "")), scope.get("path_params", {}), state),
        outcome=status,
        reason=_cut(str(state.get("audit_reason", "")), 128),
        source=_cut(client[0] if client else "", 64),
        request_id=str(state.get("request_id", ""))[:64],
    )


class AdminAuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        written = False

        async def write(status: int) -> None:
            nonlocal written
            written = True
            entry = entry_for(scope, status)
            if entry is not None:
                await self._write(scope, entry)

        async def send_audited(message: Message) -> None:
            # Written before the client sees the answer: whoever reads the log next finds it.
            if message["type"] == "http.response.start" and not written:
                await write(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_audited)
        except Exception:
            if not written:  # GatewayEdge, outside this one, answers the 500
                await write(500)
            raise

    async def _write(self, scope: Scope, entry: AdminAuditEntry) -> None:
        await write_entry(getattr(scope["app"].state, "services", None), entry)


async def write_entry(services: Services | None, entry: AdminAuditEntry) -> None:
    """Write one row in a transaction of its own; a failure is logged, never raised."""
    if services is None:
        return
    try:
        async with services.sessions() as session:
            session.add(entry)
            await session.commit()
    except Exception:  # the response is sent; the loss must be seen in the log
        log.exception(
            "audit row lost: %s %s by %s (%s)",
            entry.method,
            entry.target,
            entry.actor,
            entry.request_id,
        )
