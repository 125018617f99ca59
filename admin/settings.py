"""Settings of admin authentication: OIDC access tokens, role mapping, the bootstrap token.

With ``LORAPLEX_OIDC_ISSUER`` set, the admin API accepts JWT access tokens from that issuer
for ``LORAPLEX_OIDC_AUDIENCE``; roles come from the claim at ``LORAPLEX_OIDC_ROLE_CLAIM``
(a dotted path), mapped by ``LORAPLEX_OIDC_ROLE_MAP``. ``LORAPLEX_ADMIN_TOKEN_ENABLED=false``
turns the bootstrap/configured admin token off (then an issuer is required).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse

from pydantic import Field, PositiveFloat, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraplex.admin.roles import parse_role
from loraplex.tenancy.settings import ConfigError

_LOOPBACK_NAMES = {"localhost"}


def _loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_issuer_url(value: str) -> str:
    """An https URL with a host (http only for a loopback host: a provider in tests/dev)."""
    parsed = urlparse(value)
    if parsed.scheme not in {"https", "http"} or not parsed.hostname:
        raise ConfigError("LORAPLEX_OIDC_ISSUER", f"not an https URL with a host ({value!r})")
    if parsed.scheme == "http" and not _loopback(parsed.hostname):
        raise ConfigError(
            "LORAPLEX_OIDC_ISSUER", "must be https:// (http is accepted for a loopback host only)"
        )
    if parsed.query or parsed.fragment:
        raise ConfigError("LORAPLEX_OIDC_ISSUER", "must not carry a query or a fragment")
    return value


class AdminAuthSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", env_file=".env", extra="ignore")

    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_role_claim: str = "roles"  # a dotted path: "realm_access.roles", "groups"
    # claim value -> role (admin, operator, viewer, tenant-admin:<tenant>); empty: the claim
    # values are role names themselves
    oidc_role_map: dict[str, str] = Field(default_factory=dict)
    oidc_leeway_s: float = Field(default=30.0, ge=0, le=300)
    oidc_jwks_cache_s: PositiveFloat = 3600.0  # keys are fetched again after this long
    oidc_jwks_min_refresh_s: float = Field(default=10.0, ge=0)  # unknown kid: at most so often
    oidc_http_timeout_s: PositiveFloat = 5.0
    admin_token_enabled: bool = True
    # The web console (admin.console) at /console: single sign-on by the authorization code
    # flow with PKCE when the issuer and a client id are set; the admin token's form when
    # the admin token is enabled.
    console_enabled: bool = True
    oidc_client_id: str | None = None  # the console's client at the issuer
    oidc_client_secret: str | None = None  # none: a public client (PKCE alone)
    oidc_scopes: str = "openid"  # asked for at login, besides the audience as `resource`
    console_session_ttl_s: float = Field(default=28800.0, gt=0, le=7 * 86400)
    console_public_url: str | None = None  # https://admin.example.com behind a proxy

    @model_validator(mode="after")
    def _check_oidc(self) -> AdminAuthSettings:
        if self.oidc_issuer is not None:
            check_issuer_url(self.oidc_issuer)
            if not self.oidc_audience:
                raise ConfigError(
                    "LORAPLEX_OIDC_AUDIENCE",
                    "set the audience (resource) the admin API's access tokens are issued for",
                )
        if not self.oidc_role_claim or any(not p for p in self.oidc_role_claim.split(".")):
            raise ConfigError("LORAPLEX_OIDC_ROLE_CLAIM", "a claim name or dotted path")
        for value, role in self.oidc_role_map.items():
            if parse_role(role) is None:
                raise ConfigError(
                    "LORAPLEX_OIDC_ROLE_MAP",
                    f"{value!r} maps to {role!r}: roles are admin, operator, viewer, "
                    "tenant-admin:<tenant>",
                )
        if self.oidc_client_id and self.oidc_issuer is None:
            raise ConfigError(
                "LORAPLEX_OIDC_CLIENT_ID", "the console's client needs LORAPLEX_OIDC_ISSUER"
            )
        if self.console_public_url is not None:
            url = urlparse(self.console_public_url)
            if url.scheme not in {"http", "https"} or not url.hostname or url.query:
                raise ConfigError(
                    "LORAPLEX_CONSOLE_PUBLIC_URL", "the console's base URL: https://host[:port]"
                )
        if not self.admin_token_enabled and self.oidc_issuer is None:
            raise ConfigError(
                "LORAPLEX_ADMIN_TOKEN_ENABLED",
                "the admin token is off and no LORAPLEX_OIDC_ISSUER is set: nobody could "
                "administer this server",
            )
        return self
