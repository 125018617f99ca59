"""Who may manage a tenant's adapters: an admin whose roles allow it on that tenant (the
admin token, an OIDC token's admin, operator, viewer (read only) or tenant-admin role), or a
tenant API key holding the scope, for its own tenant only. Authorization chains on
authentication."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from loraplex.adapters.service import AdapterServices
from loraplex.admin.auth import Admin, authenticate_admin, authorize
from loraplex.admin.roles import Perm
from loraplex.gateway.deps import AuthDep, ServicesDep
from loraplex.tenancy.errors import Forbidden, Unavailable
from loraplex.tenancy.keys import parse_key
from loraplex.tenancy.tenants import get_tenant

_bearer = HTTPBearer(auto_error=False, description="The admin token or a tenant API key")


@dataclass(frozen=True)
class AdapterCaller:
    tenant_id: uuid.UUID
    actor: str  # for the audit log


def adapter_access(perm: Perm, *any_of: str) -> Callable[..., Coroutine[Any, Any, AdapterCaller]]:
    async def check(
        request: Request,
        tenant: str,
        services: ServicesDep,
        auth: AuthDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> AdapterCaller:
        token = credentials.credentials if credentials else ""
        if parse_key(token) is not None:
            principal = await auth.authenticate(token)
            request.state.admin = Admin(f"key:{principal.key_id}", roles=())  # for the audit
            if principal.tenant_name != tenant:
                raise Forbidden(
                    f"This API key belongs to another tenant; it may not manage {tenant!r}'s "
                    "adapters.",
                    param="tenant",
                )
            if not any(principal.has(scope) for scope in any_of):
                raise Forbidden(
                    f"This API key lacks the required scope: {' or '.join(any_of)}.",
                    param="scope",
                )
            return AdapterCaller(principal.tenant_id, f"key:{principal.key_id}")
        admin = await authenticate_admin(request, services, auth.secret_key, token)
        authorize(request, admin, perm, tenant)
        async with services.sessions() as session:
            row = await get_tenant(session, tenant)
        return AdapterCaller(row.id, admin.audit_actor)

    return check


AdapterWriteDep = Annotated[
    AdapterCaller, Depends(adapter_access(Perm.MANAGE_ADAPTERS, "adapters:write"))
]
AdapterReadDep = Annotated[
    AdapterCaller, Depends(adapter_access(Perm.READ, "adapters:read", "adapters:write"))
]


async def get_adapter_services(services: ServicesDep) -> AdapterServices:
    if services.adapters is None:
        raise Unavailable("adapter storage is not configured")
    return services.adapters


AdaptersDep = Annotated[AdapterServices, Depends(get_adapter_services)]
