"""A real OpenID Provider for the admin auth tests: the npm package ``oidc-provider`` run
with node (``oidc_provider.mjs`` beside this file), installed once with npm into
``<repo>/.tools/oidc-provider`` (git-ignored). Each provider is a node process on a free
loopback port, started and stopped by the caller (``running_provider``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".tools" / "oidc-provider"
PACKAGE = "oidc-provider@9.13.3"
SCRIPT = Path(__file__).with_name("oidc_provider.mjs")
AUDIENCE = "https://loraplex.test/admin"


def node_modules() -> Path:
    """The node_modules holding oidc-provider, installed on first use."""
    modules = CACHE / "node_modules"
    if (modules / "oidc-provider" / "lib" / "index.js").exists():
        return modules
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise RuntimeError("the OIDC tests need node and npm (Debian: apt-get install npm)")
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [npm, "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", "--silent", PACKAGE],
        check=True,
        timeout=600,
        capture_output=True,
    )
    return modules


@dataclass(frozen=True)
class Client:
    client_id: str
    client_secret: str
    roles: tuple[str, ...]
    ttl: int = 300  # access token lifetime, seconds
    # a console client (authorization code flow) when set: where the provider sends back
    redirect_uris: tuple[str, ...] = ()
    post_logout_redirect_uris: tuple[str, ...] = ()


@dataclass
class Provider:
    issuer: str
    clients: dict[str, Client]

    def token(self, client_id: str, resource: str = AUDIENCE) -> str:
        """An access token (JWT) by the client_credentials grant."""
        client = self.clients[client_id]
        r = httpx.post(
            f"{self.issuer}/token",
            data={"grant_type": "client_credentials", "scope": "admin", "resource": resource},
            auth=(client.client_id, client.client_secret),
            timeout=10,
        )
        r.raise_for_status()
        return str(r.json()["access_token"])

    def rotate(self) -> str:
        """Sign with a new key from now on (the old one stays published); its kid."""
        r = httpx.post(f"{self.issuer}/__rotate", timeout=10)
        r.raise_for_status()
        return str(r.json()["kid"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_provider(
    clients: list[Client], *, users: dict[str, list[str]] | None = None, timeout_s: float = 30.0
) -> Iterator[Provider]:
    """``users``: login -> roles, for the provider's login form (console clients)."""
    modules = node_modules()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="lpx-oidc-") as tmp:
        spec = Path(tmp) / "clients.json"
        listed = [
            {
                "client_id": c.client_id,
                "client_secret": c.client_secret,
                "roles": list(c.roles),
                "ttl": c.ttl,
                **(
                    {
                        "redirect_uris": list(c.redirect_uris),
                        "post_logout_redirect_uris": list(c.post_logout_redirect_uris),
                    }
                    if c.redirect_uris
                    else {}
                ),
            }
            for c in clients
        ]
        spec.write_text(json.dumps({"clients": listed, "users": users or {}}))
        log = Path(tmp) / "provider.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                ["node", str(SCRIPT), str(modules), str(port), str(spec)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            issuer = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout_s
            while "ready" not in log.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"oidc-provider did not start:\n{log.read_text()}")
                time.sleep(0.05)
            yield Provider(issuer, {c.client_id: c for c in clients})
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
