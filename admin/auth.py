"""Admin authentication: ``Authorization: Bearer <admin token>``.

A token is accepted when it equals ``LORAPLEX_ADMIN_TOKEN`` (constant-time compare) or when
its keyed hash matches an unrevoked bootstrap token row (``tenancy.bootstrap``).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

from gateway.deps import AuthDep, ServicesDep
from tenancy.errors import Unauthenticated
from tenancy.keys import hash_secret
from tenancy.models import AdminToken

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
    token = credentials.credentials
    configured = services.settings.admin_token
    if configured and hmac.compare_digest(token.encode(), configured.encode()):
        return Admin(actor="admin-token")
    digest = hash_secret(auth.secret_key, token)
    async with services.sessions() as session:
        name = await session.scalar(
            select(AdminToken.name).where(
                AdminToken.token_hash == digest, AdminToken.revoked_at.is_(None)
            )
        )
    if name is None:
        raise Unauthenticated("Incorrect admin token.")
    return Admin(actor=f"admin:{name}")


AdminDep = Annotated[Admin, Depends(get_admin)]
