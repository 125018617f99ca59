"""Logging in to the console and out of it.

Single sign-on is the authorization code flow with PKCE (S256), ``state`` and ``nonce``, by
Authlib's OAuth 2 client: the access token is asked for the admin API's audience (as
``resource``) and checked by the same ``OidcVerifier`` the API uses, so the console's roles
are exactly the API's for that person; the ID token is checked for the client and the nonce.
The admin token may log in too while it is enabled (``LORAPLEX_ADMIN_TOKEN_ENABLED``).
Each login, refused login and logout is one audit row.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Annotated, Any
from urllib.parse import urlencode

import httpx
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from loraplex.admin.audit import write_entry
from loraplex.admin.auth import BOOTSTRAP_ACTOR
from loraplex.admin.console.session import (
    LOGIN_COOKIE,
    LOGIN_TTL_S,
    SESSION_COOKIE,
    ConsoleSession,
    clear_cookie,
    read_session,
    seal,
    secure,
    set_cookie,
    unseal,
)
from loraplex.admin.oidc import TokenRejected
from loraplex.admin.roles import ADMIN
from loraplex.gateway.deps import ServicesDep
from loraplex.gateway.state import Services
from loraplex.tenancy.bootstrap import verify_admin_token
from loraplex.tenancy.models import AdminAuditEntry

router = APIRouter(prefix="/console", include_in_schema=False)


def _secret(services: Services) -> str:
    return services.settings.resolved_secret_key()


def _next(value: str | None) -> str:
    """Where to go after logging in: a console path only (no open redirect)."""
    if value and value.startswith("/console/") and not value.startswith("/console//"):
        return value
    return "/console/tenants"


def _base(request: Request, services: Services) -> str:
    public = services.settings.console_public_url
    return public.rstrip("/") if public else str(request.base_url).rstrip("/")


def sso_enabled(services: Services) -> bool:
    return services.oidc is not None and bool(services.settings.oidc_client_id)


async def _audit(
    services: Services,
    request: Request,
    action: str,
    outcome: int,
    *,
    actor: str = "anonymous",
    issuer: str = "",
    reason: str = "",
) -> None:
    client = request.client
    await write_entry(
        services,
        AdminAuditEntry(
            actor=actor[:256],
            issuer=issuer[:512],
            action=action,
            method=request.method,
            target=request.url.path.removeprefix("/")[:512],
            tenant=None,
            outcome=outcome,
            reason=reason[:128],
            source=client.host if client else "",
            request_id=str(getattr(request.state, "request_id", ""))[:64],
        ),
    )


def login_page(
    request: Request, services: Services, *, error: str = "", status: int = 200, next_: str = ""
) -> Response:
    """The login page; its token form carries a CSRF value bound to a short-lived cookie."""
    csrf = secrets.token_urlsafe(32)
    templates = request.app.state.console_templates
    response: Response = templates.TemplateResponse(
        request,
        "login.html",
        {
            "sso": sso_enabled(services),
            "token_login": services.settings.admin_token_enabled,
            "csrf": csrf,
            "error": error,
            "next": _next(next_),
            "session": None,
        },
        status_code=status,
    )
    sealed = seal(_secret(services), "login", {"csrf": csrf, "exp": time.time() + LOGIN_TTL_S})
    set_cookie(
        response,
        LOGIN_COOKIE,
        sealed,
        LOGIN_TTL_S,
        secure_cookie=secure(request, services.settings.console_public_url),
    )
    return response


def _start_session(
    request: Request, services: Services, session: ConsoleSession, next_: str
) -> Response:
    response = RedirectResponse(_next(next_), status_code=303)
    flag = secure(request, services.settings.console_public_url)
    ttl = int(services.settings.console_session_ttl_s)
    set_cookie(
        response,
        SESSION_COOKIE,
        seal(_secret(services), "session", session.payload()),
        ttl,
        secure_cookie=flag,
    )
    clear_cookie(response, LOGIN_COOKIE, secure_cookie=flag)
    return response


@router.get("/login", name="console_login")
async def login(request: Request, services: ServicesDep, next: str = "") -> Response:
    return login_page(request, services, next_=next)


def _oauth_client(request: Request, services: Services) -> AsyncOAuth2Client:
    s = services.settings
    return AsyncOAuth2Client(
        client_id=s.oidc_client_id,
        client_secret=s.oidc_client_secret,
        token_endpoint_auth_method="client_secret_basic" if s.oidc_client_secret else "none",
        redirect_uri=_base(request, services) + "/console/callback",
        scope=s.oidc_scopes,
        code_challenge_method="S256",
        timeout=s.oidc_http_timeout_s,
    )


@router.get("/login/sso")
async def login_sso(request: Request, services: ServicesDep, next: str = "") -> Response:
    if not sso_enabled(services) or services.oidc is None:
        return login_page(request, services, error="Single sign-on is not configured.", status=404)
    state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
    verifier += secrets.token_urlsafe(24)  # 43..128 characters (RFC 7636)
    async with _oauth_client(request, services) as client:
        url, _ = client.create_authorization_url(
            services.oidc.metadata["authorization_endpoint"],
            state=state,
            code_verifier=verifier,
            nonce=nonce,
            resource=services.settings.oidc_audience,
        )
    pending = {
        "state": state,
        "nonce": nonce,
        "verifier": verifier,
        "next": _next(next),
        "exp": time.time() + LOGIN_TTL_S,
    }
    response = RedirectResponse(url, status_code=303)
    set_cookie(
        response,
        LOGIN_COOKIE,
        seal(_secret(services), "login", pending),
        LOGIN_TTL_S,
        secure_cookie=secure(request, services.settings.console_public_url),
    )
    return response


async def _exchange(
    request: Request, services: Services, pending: dict[str, Any], code: str
) -> ConsoleSession:
    oidc = services.oidc
    if oidc is None or not services.settings.oidc_client_id:
        raise TokenRejected("sso_off", "Single sign-on is not configured.")
    async with _oauth_client(request, services) as client:
        token = await client.fetch_token(
            oidc.metadata["token_endpoint"],
            code=code,
            code_verifier=pending["verifier"],
            resource=services.settings.oidc_audience,
        )
    id_token, access_token = token.get("id_token"), token.get("access_token")
    if not isinstance(id_token, str) or not isinstance(access_token, str):
        raise TokenRejected("no_token", "The identity provider sent no ID or access token.")
    claims = await oidc.verify_id_token(
        id_token, services.settings.oidc_client_id, pending["nonce"]
    )
    identity = await oidc.verify(access_token)  # the API's own check and role mapping
    if identity.subject != str(claims["sub"]):
        raise TokenRejected("subject", "The ID and access tokens name different subjects.")
    if not identity.roles:
        raise TokenRejected("no_role", f"{identity.subject} holds no role on this server.")
    ttl = services.settings.console_session_ttl_s
    return ConsoleSession.new(identity.subject, identity.issuer, identity.roles, "oidc", ttl)


@router.get("/callback")
async def callback(
    request: Request,
    services: ServicesDep,
    code: str = "",
    state: str = "",
    error: str = "",
) -> Response:
    pending = unseal(_secret(services), "login", request.cookies.get(LOGIN_COOKIE))
    reason, message = "", ""
    if pending is None or "state" not in pending:
        reason, message = "no_login", "The login expired or was not started here; try again."
    elif not hmac.compare_digest(state.encode(), str(pending["state"]).encode()):
        reason, message = "state", "The login's state does not match; try again."
    elif error or not code:
        reason, message = "provider", f"The identity provider refused: {error or 'no code'}."
    if not reason and pending is not None:
        try:
            session = await _exchange(request, services, pending, code)
        except TokenRejected as exc:
            reason, message = exc.reason, exc.message
        except (OAuthError, httpx.HTTPError, KeyError, ValueError) as exc:
            reason, message = "exchange", f"The code exchange failed ({type(exc).__name__})."
        else:
            await _audit(
                services, request, "console_login", 200, actor=session.subject,
                issuer=session.issuer,
            )  # fmt: skip
            return _start_session(request, services, session, str(pending.get("next", "")))
    await _audit(services, request, "console_login", 401, reason=reason)
    return login_page(request, services, error=message, status=401)


@router.post("/login/token")
async def login_token(
    request: Request,
    services: ServicesDep,
    token: Annotated[str, Form(max_length=512)],
    csrf: Annotated[str, Form(max_length=128)],
    next: Annotated[str, Form(max_length=512)] = "",
) -> Response:
    pending = unseal(_secret(services), "login", request.cookies.get(LOGIN_COOKIE))
    expected = str((pending or {}).get("csrf", ""))
    if not expected or not hmac.compare_digest(csrf.encode(), expected.encode()):
        await _audit(services, request, "console_login", 403, reason="csrf")
        return login_page(request, services, error="The form expired; try again.", status=403)
    settings = services.settings
    ok = False
    if settings.admin_token_enabled and token:
        async with services.sessions() as db:
            ok = await verify_admin_token(
                db,
                secret_key=_secret(services),
                configured_token=settings.admin_token,
                presented=token,
            )
    if not ok:
        reason = "bad_token" if settings.admin_token_enabled else "admin_token_disabled"
        await _audit(services, request, "console_login", 401, reason=reason)
        return login_page(request, services, error="That admin token is not accepted.", status=401)
    session = ConsoleSession.new(
        BOOTSTRAP_ACTOR, "", (ADMIN,), "token", settings.console_session_ttl_s
    )
    await _audit(services, request, "console_login", 200, actor=BOOTSTRAP_ACTOR)
    return _start_session(request, services, session, next)


@router.post("/logout")
async def logout(
    request: Request, services: ServicesDep, csrf: Annotated[str, Form(max_length=128)] = ""
) -> Response:
    session = read_session(request, _secret(services))
    if session is None or not hmac.compare_digest(csrf.encode(), session.csrf.encode()):
        await _audit(services, request, "console_logout", 403, reason="csrf")
        return RedirectResponse("/console/login", status_code=303)
    target = "/console/login"
    end = services.oidc.metadata.get("end_session_endpoint") if services.oidc else None
    if session.via == "oidc" and isinstance(end, str) and services.settings.oidc_client_id:
        back = _base(request, services) + "/console/login"
        query = {"client_id": services.settings.oidc_client_id, "post_logout_redirect_uri": back}
        target = f"{end}?{urlencode(query)}"
    await _audit(
        services, request, "console_logout", 200, actor=session.subject, issuer=session.issuer
    )
    response = RedirectResponse(target, status_code=303)
    clear_cookie(
        response,
        SESSION_COOKIE,
        secure_cookie=secure(request, services.settings.console_public_url),
    )
    return response
