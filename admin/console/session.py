"""The console's session: an encrypted cookie (JWE, ``dir`` + A256GCM, with a key derived
from ``LORAPLEX_SECRET_KEY``), so that every gateway worker reads it without a shared store
and the browser can neither read nor change it.

It holds who logged in (subject, issuer, roles as mapped at login), how (``oidc`` or
``token``), when it ends, and the CSRF token the pages send back in ``X-CSRF-Token`` on every
request that changes something (a synchronizer token: the server compares the header with the
value inside the encrypted cookie). No access token, no secret is stored in it.

A second short-lived cookie carries a login in progress (OIDC ``state``, ``nonce`` and the
PKCE ``code_verifier``, or the token form's CSRF value) from the redirect to the callback.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OctKey
from starlette.requests import Request
from starlette.responses import Response

from loraplex.admin.roles import Role, parse_role

SESSION_COOKIE = "lpx_console"
LOGIN_COOKIE = "lpx_console_login"
CSRF_HEADER = "x-csrf-token"
LOGIN_TTL_S = 600  # from the redirect to the identity provider until its callback
_HEADER = {"alg": "dir", "enc": "A256GCM"}


def _key(secret_key: str, purpose: str) -> OctKey:
    raw = hmac.new(secret_key.encode(), f"loraplex-console-{purpose}".encode(), hashlib.sha256)
    return OctKey.import_key(raw.digest())


def seal(secret_key: str, purpose: str, payload: dict[str, Any]) -> str:
    return jwe.encrypt_compact(_HEADER, json.dumps(payload).encode(), _key(secret_key, purpose))


def unseal(secret_key: str, purpose: str, value: str | None) -> dict[str, Any] | None:
    """The payload, or None when absent, tampered with, sealed for another purpose or
    expired (``exp``, seconds since the epoch)."""
    if not value or len(value) > 8192:
        return None
    try:
        plain = jwe.decrypt_compact(value, _key(secret_key, purpose)).plaintext
        payload = json.loads(plain or b"")
    except (JoseError, ValueError):
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("exp"), int | float):
        return None
    return payload if payload["exp"] > time.time() else None


@dataclass(frozen=True)
class ConsoleSession:
    subject: str
    issuer: str  # "" for the admin token
    roles: tuple[Role, ...]
    via: str  # "oidc" or "token"
    csrf: str
    expires_at: float

    def payload(self) -> dict[str, Any]:
        return {
            "sub": self.subject,
            "iss": self.issuer,
            "roles": [str(r) for r in self.roles],
            "via": self.via,
            "csrf": self.csrf,
            "exp": self.expires_at,
        }

    @classmethod
    def new(
        cls, subject: str, issuer: str, roles: tuple[Role, ...], via: str, ttl_s: float
    ) -> ConsoleSession:
        return cls(subject, issuer, roles, via, secrets.token_urlsafe(32), time.time() + ttl_s)

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> ConsoleSession | None:
        try:
            roles = tuple(r for r in (parse_role(str(v)) for v in p["roles"]) if r is not None)
            return cls(str(p["sub"]), str(p["iss"]), roles, str(p["via"]), str(p["csrf"]), p["exp"])
        except (KeyError, TypeError):
            return None


def read_session(request: Request, secret_key: str) -> ConsoleSession | None:
    payload = unseal(secret_key, "session", request.cookies.get(SESSION_COOKIE))
    return None if payload is None else ConsoleSession.from_payload(payload)


def csrf_ok(request: Request, session: ConsoleSession) -> bool:
    """Safe methods pass; any other needs the session's CSRF token in ``X-CSRF-Token``."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return True
    sent = request.headers.get(CSRF_HEADER, "")
    return bool(sent) and hmac.compare_digest(sent.encode(), session.csrf.encode())


def secure(request: Request, public_url: str | None) -> bool:
    """Cookies are Secure when the console is reached over https."""
    if public_url:
        return public_url.startswith("https://")
    return request.url.scheme == "https"


def set_cookie(
    response: Response, name: str, value: str, max_age: int, *, secure_cookie: bool
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        secure=secure_cookie,
        httponly=True,
        samesite="lax",
    )


def clear_cookie(response: Response, name: str, *, secure_cookie: bool) -> None:
    response.delete_cookie(name, path="/", secure=secure_cookie, httponly=True, samesite="lax")
