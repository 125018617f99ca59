"""``Annotated`` dependency aliases the routes declare. Authorization chains on
authentication: ``InferenceDep`` authenticates the bearer token (as ``PrincipalDep``
does), then checks the key's scopes.

Every dependency is ``async def``, even when it never awaits: FastAPI runs a plain
``def`` dependency in its thread pool, a thread round trip per dependency per request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.ext.asyncio import AsyncSession

from loraplex.gateway.auth import KeyAuthenticator
from loraplex.gateway.request_log import note_tenant
from loraplex.gateway.state import Services
from loraplex.tenancy.errors import Forbidden, Unavailable
from loraplex.tenancy.principal import Principal

_bearer = HTTPBearer(auto_error=False, description="A tenant API key: lpx_<prefix>_<secret>")


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_session(services: ServicesDep) -> AsyncIterator[AsyncSession]:
    async with services.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def _authenticator(services: Services) -> KeyAuthenticator:
    if services.keys is None:
        raise Unavailable("authentication is not configured yet")
    return services.keys


async def get_authenticator(services: ServicesDep) -> KeyAuthenticator:
    return _authenticator(services)


AuthDep = Annotated[KeyAuthenticator, Depends(get_authenticator)]


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def authenticate(
    services: Services, credentials: HTTPAuthorizationCredentials | None
) -> Principal:
    principal = await _authenticator(services).authenticate(
        credentials.credentials if credentials else None
    )
    note_tenant(principal.tenant_name)
    return principal


def bearer_token(authorization: str | None) -> str | None:
    """The key in an ``Authorization`` header value, read as ``_bearer`` reads it (FastAPI's
    ``HTTPBearer(auto_error=False)``): None unless it is ``Bearer <credentials>``."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
        return None
    return credentials


async def authorize(services: Services, token: str | None, any_of: tuple[str, ...]) -> Principal:
    """Authenticate ``token``, then require one of the scopes ``any_of``."""
    principal = await _authenticator(services).authenticate(token)
    note_tenant(principal.tenant_name)
    if not any(principal.has(scope) for scope in any_of):
        raise Forbidden(
            f"This API key lacks the required scope: {' or '.join(any_of)}.", param="scope"
        )
    return principal


async def get_principal(services: ServicesDep, credentials: BearerDep) -> Principal:
    return await authenticate(services, credentials)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_scope(*any_of: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency passing principals that hold at least one of ``any_of``. It
    authenticates itself (as ``get_principal`` does) rather than depending on
    ``PrincipalDep``: FastAPI solves every dependency of the tree on every request, at
    ~50 us each here (a 2-core box), and this one is on every inference request."""

    async def check(services: ServicesDep, credentials: BearerDep) -> Principal:
        return await authorize(services, credentials.credentials if credentials else None, any_of)

    return check


InferenceDep = Annotated[Principal, Depends(require_scope("inference"))]
ModelsReadDep = Annotated[Principal, Depends(require_scope("inference", "adapters:read"))]
