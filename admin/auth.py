"""Admin authentication and authorization: ``Authorization: Bearer <token>``.

A console session (``admin.console.session``: an encrypted cookie, with the CSRF token in
``X-CSRF-Token`` on anything but a read) stands for a token when none is sent. A token is an
OIDC access token (a JWT, when ``LORAPLEX_OIDC_ISSUER`` is set: verified by
``admin.oidc``, roles from its role claim) or the admin token, which is the ``admin`` role:
``LORAPLEX_ADMIN_TOKEN`` (constant-time compare) or, when none is configured, an unrevoked
bootstrap admin token (``tenancy.bootstrap``). ``LORAPLEX_ADMIN_TOKEN_ENABLED=false`` refuses
the admin token. Routes declare a permission (``require``); a role lacking it is a 403.

Who called, and why a call was refused, are left on ``request.state`` for ``admin.audit``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from loraplex.admin.console.session import csrf_ok, read_session
from loraplex.admin.oidc import TokenRejected, looks_like_jwt
from loraplex.admin.roles import ADMIN, Perm, Role, allowed
from loraplex.gateway.deps import AuthDep, ServicesDep
from loraplex.gateway.state import Services
from loraplex.tenancy.bootstrap import verify_admin_token
from loraplex.tenancy.errors import Forbidden, Unauthenticated

_bearer = HTTPBearer(
    auto_error=False, description="An OIDC access token (JWT) or the operator's admin token"
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
BOOTSTRAP_ACTOR = "bootstrap-token"


@dataclass(frozen=True)
class Admin:
    actor: str  # the OIDC subject, or "bootstrap-token"
    issuer: str = ""  # the OIDC issuer; "" for the admin token
    roles: tuple[Role, ...] = (ADMIN,)

    @property
    def audit_actor(self) -> str:
        """The name written in ``audit_log`` rows (128 characters)."""
        return self.actor[:128]


def _refuse(request: Request, reason: str, error: Exception) -> Exception:
    request.state.audit_reason = reason
    return error


async def authenticate_admin(
    request: Request, services: Services, secret_key: str, token: str | None
) -> Admin:
    settings = services.settings
    if not token and settings.console_enabled:
        console = read_session(request, secret_key)
        if console is not None and (console.via == "oidc" or settings.admin_token_enabled):
            admin = Admin(console.subject, console.issuer, console.roles)
            request.state.admin = admin  # who, also when refused below
            if not csrf_ok(request, console):
                raise _refuse(
                    request,
                    "csrf",
                    Forbidden(
                        "This request changes something and lacks the console's CSRF token "
                        "(X-CSRF-Token).",
                        code="csrf_failed",
                    ),
                )
            return admin
    if not token:
        raise _refuse(
            request,
            "no_token",
            Unauthenticated("An admin token is required: `Authorization: Bearer <token>`."),
        )
    if services.oidc is not None and looks_like_jwt(token):
        try:
            identity = await services.oidc.verify(token)
        except TokenRejected as exc:
            raise _refuse(request, exc.reason, exc) from None
        admin = Admin(identity.subject, identity.issuer, identity.roles)
    elif not settings.admin_token_enabled:
        raise _refuse(
            request,
            "admin_token_disabled",
            Unauthenticated(
                "The admin token is turned off on this server; use an OIDC access token."
            ),
        )
    else:
        async with services.sessions() as session:
            ok = await verify_admin_token(
                session,
                secret_key=secret_key,
                configured_token=settings.admin_token,
                presented=token,
            )
        if not ok:
            raise _refuse(request, "bad_token", Unauthenticated("Incorrect admin token."))
        admin = Admin(BOOTSTRAP_ACTOR)
    request.state.admin = admin
    return admin


def authorize(request: Request, admin: Admin, perm: Perm, tenant: str | None) -> None:
    if not allowed(admin.roles, perm, tenant):
        held = ", ".join(str(r) for r in admin.roles) or "none"
        where = f" on tenant {tenant!r}" if tenant else ""
        raise _refuse(
            request,
            f"forbidden:{perm.value}",
            Forbidden(
                f"Your roles ({held}) do not allow {perm.value}{where}.",
                param="role",
                code="insufficient_role",
            ),
        )


def require(
    perm: Perm, tenant_param: str | None = None
) -> Callable[..., Coroutine[Any, Any, Admin]]:
    """A dependency passing admins whose roles allow ``perm``; ``tenant_param`` names the
    path (else query) parameter holding the tenant the route acts on, if it acts on one."""

    async def check(
        request: Request, services: ServicesDep, auth: AuthDep, credentials: Credentials
    ) -> Admin:
        token = credentials.credentials if credentials else None
        admin = await authenticate_admin(request, services, auth.secret_key, token)
        tenant = None
        if tenant_param is not None:
            tenant = request.path_params.get(tenant_param) or request.query_params.get(tenant_param)
            request.state.audit_tenant = tenant
        authorize(request, admin, perm, tenant)
        return admin

    return check


async def get_identity(
    request: Request, services: ServicesDep, auth: AuthDep, credentials: Credentials
) -> Admin:
    """Authentication alone (``GET /admin/v1/me``)."""
    token = credentials.credentials if credentials else None
    return await authenticate_admin(request, services, auth.secret_key, token)


IdentityDep = Annotated[Admin, Depends(get_identity)]
AdminDep = Annotated[Admin, Depends(require(Perm.SYSTEM))]  # everything: the admin role
ReadDep = Annotated[Admin, Depends(require(Perm.READ))]
TenantReadDep = Annotated[Admin, Depends(require(Perm.READ, "name"))]
ManageTenantsDep = Annotated[Admin, Depends(require(Perm.MANAGE_TENANTS, "name"))]
ManagePlansDep = Annotated[Admin, Depends(require(Perm.MANAGE_PLANS))]
KeysReadDep = Annotated[Admin, Depends(require(Perm.READ, "name"))]
ManageKeysDep = Annotated[Admin, Depends(require(Perm.MANAGE_KEYS, "name"))]
UsageDep = Annotated[Admin, Depends(require(Perm.USAGE, "tenant"))]
AuditDep = Annotated[Admin, Depends(require(Perm.AUDIT))]
