"""Admin tests: a real uvicorn server (no engine) over a fresh PostgreSQL database; for
admin auth, a real OpenID Provider (``oidc_tool``) whose tokens the server takes."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings
from tests.admin.oidc_tool import AUDIENCE, Client, Provider, running_provider
from tests.gateway.live import fresh_database, live_server


@dataclass(frozen=True)
class AdminServer:
    url: str
    database_url: str
    admin_token: str
    secret_key: str

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)


def _serve(admin_token: str | None, data_dir: Path) -> Iterator[AdminServer]:
    secret = secrets.token_hex(32)
    with fresh_database() as url:
        settings = GatewaySettings(
            database_url=url,
            admin_token=admin_token,
            secret_key=secret,
            key_cache_ttl_s=0.5,
            data_dir=data_dir,  # (the usage outbox; the default is the checkout's .loraplex)
        )
        with live_server(create_app(settings)) as base:
            yield AdminServer(
                url=base, database_url=url, admin_token=admin_token or "", secret_key=secret
            )


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminServer]:
    """Admin auth by a configured ``LORAPLEX_ADMIN_TOKEN``."""
    yield from _serve(secrets.token_hex(16), tmp_path_factory.mktemp("admin-data"))


@pytest.fixture(scope="module")
def bootstrap_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminServer]:
    """No configured admin token: the bootstrap token (a hash in the database) is used."""
    yield from _serve(None, tmp_path_factory.mktemp("bootstrap-data"))


@pytest.fixture
def admin(admin_server: AdminServer) -> Iterator[httpx.Client]:
    with admin_server.client() as client:
        yield client


# --- OIDC: a real provider (npm oidc-provider, run with node) and a server trusting it ---

ROLE_MAP = {
    "platform-admins": "admin",
    "ops": "operator",
    "support": "viewer",
    "acme-admins": "tenant-admin:acme",
}
CLIENTS = [
    Client("c-admin", secrets.token_hex(16), ("platform-admins",)),
    Client("c-operator", secrets.token_hex(16), ("ops",)),
    Client("c-viewer", secrets.token_hex(16), ("support",)),
    Client("c-acme", secrets.token_hex(16), ("acme-admins", "unmapped-group")),
    Client("c-norole", secrets.token_hex(16), ("unmapped-group",)),
    Client("c-short", secrets.token_hex(16), ("platform-admins",), ttl=4),
]


@dataclass(frozen=True)
class OidcServer:
    url: str
    database_url: str
    admin_token: str
    provider: Provider
    app: FastAPI

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0
        )

    def as_role(self, client_id: str) -> httpx.Client:
        return self.client(self.provider.token(client_id))


@pytest.fixture(scope="module")
def oidc_provider() -> Iterator[Provider]:
    with running_provider(CLIENTS) as provider:
        yield provider


def oidc_settings(database_url: str, issuer: str, **overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "database_url": database_url,
        "secret_key": secrets.token_hex(32),
        "admin_token": secrets.token_hex(16),
        "key_cache_ttl_s": 0.5,
        "oidc_issuer": issuer,
        "oidc_audience": AUDIENCE,
        "oidc_role_claim": "realm_access.roles",
        "oidc_role_map": ROLE_MAP,
        "oidc_leeway_s": 0,
        "oidc_jwks_min_refresh_s": 0.5,
        "data_dir": Path(tempfile.mkdtemp(prefix="lpx-oidc-")),
        **overrides,
    }
    return GatewaySettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def oidc_server(oidc_provider: Provider) -> Iterator[OidcServer]:
    """A server that takes the provider's access tokens, and its admin token."""
    with fresh_database() as url:
        settings = oidc_settings(url, oidc_provider.issuer)
        app = create_app(settings)
        with live_server(app) as base:
            yield OidcServer(base, url, settings.admin_token or "", oidc_provider, app)
