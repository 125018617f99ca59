"""Admin tests: a real uvicorn server (no engine) over a fresh PostgreSQL database."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings
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


def _serve(admin_token: str | None) -> Iterator[AdminServer]:
    secret = secrets.token_hex(32)
    with fresh_database() as url:
        settings = GatewaySettings(
            database_url=url, admin_token=admin_token, secret_key=secret, key_cache_ttl_s=0.5
        )
        with live_server(create_app(settings)) as base:
            yield AdminServer(
                url=base, database_url=url, admin_token=admin_token or "", secret_key=secret
            )


@pytest.fixture(scope="module")
def admin_server() -> Iterator[AdminServer]:
    """Admin auth by a configured ``LORAPLEX_ADMIN_TOKEN``."""
    yield from _serve(secrets.token_hex(16))


@pytest.fixture(scope="module")
def bootstrap_server() -> Iterator[AdminServer]:
    """No configured admin token: the bootstrap token (a hash in the database) is used."""
    yield from _serve(None)


@pytest.fixture
def admin(admin_server: AdminServer) -> Iterator[httpx.Client]:
    with admin_server.client() as client:
        yield client
