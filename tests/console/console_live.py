"""The console against real parts (the fixture is registered by conftest.py): a uvicorn server with an in-process engine (tiny Llama on
CPU), PostgreSQL, a moto S3 server, and a real OpenID Provider (npm ``oidc-provider``) whose
login form people use; a headless Chromium (``browser.py``) for the browser test."""

from __future__ import annotations

import html
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from loraplex.engine.config import EngineConfig
from loraplex.engine_wiring import inproc_engine
from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings
from tests.adapters.moto_proc import MotoServer
from tests.admin.oidc_tool import AUDIENCE, Client, Provider, running_provider
from tests.gateway.live import free_port, fresh_database, live_server, wait_until

BASE = "tiny-llama"
ROLE_MAP = {
    "platform-admins": "admin",
    "ops": "operator",
    "support": "viewer",
    "acme-admins": "tenant-admin:acme",
}
# logins at the provider's form (any password) -> the groups in their tokens
USERS = {
    "alice": ["platform-admins"],
    "vera": ["support"],
    "tara": ["acme-admins"],
    "nobody": ["unmapped-group"],
}


@dataclass(frozen=True)
class ConsoleServer:
    url: str
    admin_token: str
    provider: Provider

    def admin(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)


@pytest.fixture(scope="module")
def console_server(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConsoleServer]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    secret = secrets.token_hex(16)
    console = Client(
        "console",
        secret,
        (),
        redirect_uris=(f"{base}/console/callback",),
        post_logout_redirect_uris=(f"{base}/console/login",),
    )
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)  # moto's (as tests/adapters/conftest.py sets)
    moto = MotoServer()
    moto.start()
    bucket = f"lpx-console-{secrets.token_hex(4)}"
    moto.client().create_bucket(Bucket=bucket)
    config = EngineConfig(
        device="cpu", dtype="float32", max_num_seqs=8, num_gpu_blocks=256, max_loras=4,
        max_cpu_loras=8, max_lora_rank=8,
    )  # fmt: skip
    try:
        with running_provider([console], users=USERS) as provider, fresh_database() as url:
            settings = GatewaySettings(
                database_url=url,
                admin_token=secrets.token_hex(16),
                secret_key=secrets.token_hex(32),
                data_dir=tmp_path_factory.mktemp("console-data"),
                key_cache_ttl_s=0.5,
                model=str(tiny_llama_dir),
                served_model_name=BASE,
                max_lora_rank=8,
                object_store_url=f"s3://{bucket}/lpx",
                s3_endpoint_url=moto.url,
                usage_export_enabled=False,
                oidc_issuer=provider.issuer,
                oidc_audience=AUDIENCE,
                oidc_role_claim="realm_access.roles",
                oidc_role_map=ROLE_MAP,
                oidc_client_id="console",
                oidc_client_secret=secret,
                oidc_scopes="openid admin",
            )
            app = create_app(
                settings,
                engine_factory=lambda: inproc_engine(settings, str(tiny_llama_dir), config),
            )
            with live_server(app, port=port) as served, httpx.Client(base_url=served) as probe:
                wait_until(lambda: probe.get("/ready").status_code == 200, 120)
                yield ConsoleServer(served, settings.admin_token or "", provider)
    finally:
        moto.stop()


_FORM = re.compile(r'<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>', re.S)
_HIDDEN = re.compile(r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"')


@contextmanager
def sso_login(base: str, login: str) -> Iterator[httpx.Client]:
    """A client logged in to the console as ``login``, through the provider's own login
    and consent forms (posted as a browser would)."""
    with httpx.Client(base_url=base, follow_redirects=True, timeout=30.0) as client:
        yield _log_in(client, base, login)


def _log_in(client: httpx.Client, base: str, login: str) -> httpx.Client:
    r = client.get("/console/login/sso")
    for _ in range(4):
        if str(r.url).startswith(base + "/console/"):
            if r.status_code == 200 and "lpx_console" in client.cookies:
                return client
            break
        match = _FORM.search(r.text)
        assert match is not None, f"no form at {r.url}: {r.text[:500]}"
        data = {k: html.unescape(v) for k, v in _HIDDEN.findall(match.group(2))}
        if 'name="login"' in match.group(2):
            data.update(login=login, password="any")
        r = client.post(urljoin(str(r.url), html.unescape(match.group(1))), data=data)
    error = re.search(r'id="login-error">([^<]*)<', r.text)
    raise AssertionError(
        f"login as {login} did not reach the console: {r.url} "
        f"{html.unescape(error.group(1)) if error else r.text[:300]}"
    )


def csrf_of(page: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', page)
    assert match is not None
    return match.group(1)
