"""OIDC access tokens (JWT) for the admin API, verified with Authlib's JOSE library
(``joserfc``, which ``authlib.jose`` now defers to and which Authlib installs).

The issuer's discovery document names its JWKS; keys are cached and fetched again when they
are older than ``jwks_cache_s``, or when a token names a key id the cache lacks (the issuer
rotated its keys) — at most once per ``min_refresh_s``, so that tokens with made-up key ids
cannot make this server hammer the issuer. Checked: signature (asymmetric algorithms only),
issuer, audience, expiry and not-before (with ``leeway_s``), and a subject.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ClaimError,
    ExpiredTokenError,
    JoseError,
)
from joserfc.jwk import JWKRegistry
from joserfc.jws import extract_compact

from loraplex.admin.roles import Role, roles_from_claim
from loraplex.admin.settings import AdminAuthSettings
from loraplex.tenancy.errors import Unauthenticated
from loraplex.tenancy.settings import ConfigError

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
ALGORITHMS += ["EdDSA"]


class TokenRejected(Unauthenticated):
    """401 for an access token; ``reason`` is a short code for the audit log."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, code="invalid_token")
        self.reason = reason


@dataclass(frozen=True)
class OidcIdentity:
    subject: str
    issuer: str
    roles: tuple[Role, ...]


def looks_like_jwt(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and all(parts[:2]) and token.startswith("eyJ")


def claim_values(claims: dict[str, Any], path: str) -> list[str]:
    """The strings at a dotted ``path``: a list of them, or one string (space-separated
    values, as ``scope`` is written)."""
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return []
        node = node[part]
    if isinstance(node, str):
        return node.split()
    if isinstance(node, list):
        return [v for v in node if isinstance(v, str)]
    return []


class OidcVerifier:
    def __init__(self, settings: AdminAuthSettings, client: httpx.AsyncClient) -> None:
        if settings.oidc_issuer is None or settings.oidc_audience is None:
            raise ValueError("OidcVerifier needs an issuer and an audience")
        self.issuer = settings.oidc_issuer
        self.audience = settings.oidc_audience
        self._settings = settings
        self._client = client
        self._jwks_uri = ""
        self.metadata: dict[str, Any] = {}  # the discovery document (the console's endpoints)
        self._keys: dict[str, Any] = {}
        self._fetched_at = float("-inf")  # monotonic time of the last JWKS fetch
        self._lock = asyncio.Lock()
        self.jwks_fetches = 0  # how often the JWKS was fetched (for tests and metrics)

    async def _get_json(self, url: str) -> dict[str, Any]:
        r = await self._client.get(url, timeout=self._settings.oidc_http_timeout_s)
        r.raise_for_status()
        body = r.json()
        if not isinstance(body, dict):
            raise ValueError(f"{url} did not answer a JSON object")
        return body

    async def start(self) -> None:
        """Reads the discovery document and the keys; ConfigError naming the issuer
        setting when either cannot be had or does not fit."""
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            doc = await self._get_json(url)
        except (httpx.HTTPError, ValueError, json.JSONDecodeError) as exc:
            raise ConfigError(
                "LORAPLEX_OIDC_ISSUER", f"cannot read the discovery document {url}: {exc}"
            ) from None
        if doc.get("issuer") != self.issuer:
            raise ConfigError(
                "LORAPLEX_OIDC_ISSUER",
                f"the discovery document names issuer {doc.get('issuer')!r}, not {self.issuer!r}",
            )
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise ConfigError("LORAPLEX_OIDC_ISSUER", "the discovery document has no jwks_uri")
        self._jwks_uri = jwks_uri
        self.metadata = doc
        try:
            await self._refresh()
        except (httpx.HTTPError, ValueError, JoseError) as exc:
            raise ConfigError(
                "LORAPLEX_OIDC_ISSUER", f"cannot read the issuer's keys {jwks_uri}: {exc}"
            ) from None

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        self.jwks_fetches += 1
        body = await self._get_json(self._jwks_uri)
        keys = body.get("keys")
        if not isinstance(keys, list):
            raise ValueError("the JWKS has no keys list")
        found: dict[str, Any] = {}
        for jwk in keys:
            if isinstance(jwk, dict) and jwk.get("use", "sig") == "sig" and "d" not in jwk:
                found[str(jwk.get("kid", ""))] = JWKRegistry.import_key(jwk)
        self._keys = found

    async def _key(self, kid: str) -> Any:
        age = time.monotonic() - self._fetched_at
        if kid in self._keys and age < self._settings.oidc_jwks_cache_s:
            return self._keys[kid]
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            stale = age >= self._settings.oidc_jwks_cache_s
            if (kid not in self._keys and age >= self._settings.oidc_jwks_min_refresh_s) or stale:
                try:
                    await self._refresh()
                except (httpx.HTTPError, ValueError, JoseError):
                    pass  # keep the keys known; an unknown kid stays unknown
        if kid not in self._keys:
            raise TokenRejected("unknown_key", "The access token is signed with an unknown key.")
        return self._keys[kid]

    async def verify(self, token: str) -> OidcIdentity:
        try:
            header = extract_compact(token.encode()).headers()
        except (JoseError, ValueError):
            raise TokenRejected("malformed", "The access token is not a well-formed JWT.") from None
        if header.get("alg") not in ALGORITHMS:
            raise TokenRejected("algorithm", "The access token's signing algorithm is refused.")
        key = await self._key(str(header.get("kid", "")))
        registry = jwt.JWTClaimsRegistry(
            leeway=int(self._settings.oidc_leeway_s),
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.audience},
            exp={"essential": True},
            sub={"essential": True},
        )
        try:
            claims = jwt.decode(token, key, algorithms=ALGORITHMS).claims
            registry.validate(claims)
        except BadSignatureError:
            raise TokenRejected("signature", "The access token's signature is wrong.") from None
        except ExpiredTokenError:
            raise TokenRejected("expired", "The access token has expired.") from None
        except ClaimError as exc:
            reason = {"iss": "issuer", "aud": "audience"}.get(exc.claim, f"claim_{exc.claim}")
            raise TokenRejected(
                reason, f"The access token's {exc.claim!r} claim is missing or not accepted here."
            ) from None
        except (JoseError, ValueError):
            raise TokenRejected("invalid", "The access token is not valid.") from None
        values = claim_values(claims, self._settings.oidc_role_claim)
        return OidcIdentity(
            subject=str(claims["sub"]),
            issuer=self.issuer,
            roles=roles_from_claim(values, self._settings.oidc_role_map),
        )

    async def verify_id_token(self, token: str, client_id: str, nonce: str) -> dict[str, Any]:
        """An ID token from the console's login: signed by the issuer's keys, for
        ``client_id``, unexpired, carrying the login's ``nonce``. Its claims."""
        try:
            header = extract_compact(token.encode()).headers()
        except (JoseError, ValueError):
            raise TokenRejected("malformed", "The ID token is not a well-formed JWT.") from None
        if header.get("alg") not in ALGORITHMS:
            raise TokenRejected("algorithm", "The ID token's signing algorithm is refused.")
        key = await self._key(str(header.get("kid", "")))
        registry = jwt.JWTClaimsRegistry(
            leeway=int(self._settings.oidc_leeway_s),
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": client_id},
            exp={"essential": True},
            sub={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            claims = jwt.decode(token, key, algorithms=ALGORITHMS).claims
            registry.validate(claims)
        except (JoseError, ValueError):
            raise TokenRejected("id_token", "The ID token is not valid for this login.") from None
        return dict(claims)


@asynccontextmanager
async def open_oidc(settings: AdminAuthSettings) -> AsyncIterator[OidcVerifier | None]:
    """The verifier, its discovery document and keys read (None without an issuer)."""
    if settings.oidc_issuer is None:
        yield None
        return
    async with httpx.AsyncClient(follow_redirects=False) as client:
        verifier = OidcVerifier(settings, client)
        await verifier.start()
        yield verifier


def check_issuer(settings: AdminAuthSettings) -> None:
    """At start-up, before any worker: ConfigError when the issuer cannot be used."""

    async def go() -> None:
        async with open_oidc(settings):
            pass

    asyncio.run(go())
