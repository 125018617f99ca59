"""Admin authentication: ``Authorization: Bearer <admin token>``.

A token is accepted when it equals ``LORAPLEX_ADMIN_TOKEN`` (constant-time compare) or, when
none is configured, when its keyed hash matches an unrevoked bootstrap admin token
(``tenancy.bootstrap.verify_admin_token``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from loraplex.gateway.deps import AuthDep, ServicesDep
from loraplex.tenancy.bootstrap import verify_admin_token
from loraplex.tenancy.errors import Unauthenticated

_bearer = HTTPBearer(auto_error=False, description="The operator's admin token")


@dataclass(frozen=True)
class Admin:
    actor: str  # written to the audit log


async def get_admin(
    services: ServicesDep,
    auth: AuthDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Admin:
    if credentials is None or not credentials.credentials:
        raise Unauthenticated("An admin token is required: `Authorization: Bearer <token>`.")
    async with services.sessions() as session:
        ok = await verify_admin_token(
            session,
            secret_key=auth.secret_key,
            configured_token=services.settings.admin_token,
            presented=credentials.credentials,
        )
    if not ok:
        raise Unauthenticated("Incorrect admin token.")
    # The configured token is one shared identity; bootstrap tokens are named in the audit.
    return Admin(actor="admin-token" if services.settings.admin_token else "admin:bootstrap")


AdminDep = Annotated[Admin, Depends(get_admin)]
