"""A live app (uvicorn, no engine) over a fresh PostgreSQL database and the moto S3 server,
validating uploads against the tiny Llama's ``config.json``."""

from __future__ import annotations

import secrets
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from moto_proc import MotoServer

from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings
from tests.gateway.live import fresh_database, live_server, wait_until

PREFIX = "lpx"


@dataclass(frozen=True)
class AdapterServer:
    url: str
    database_url: str
    admin_token: str
    bucket: str
    moto: MotoServer
    cache_dir: Path

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)

    def bucket_keys(self) -> list[str]:
        return self.moto.keys(self.bucket)


@contextmanager
def adapter_server(
    moto: MotoServer,
    model_dir: Path,
    cache_dir: Path,
    engine_factory: Callable[[GatewaySettings], Any] | None = None,
    **settings: Any,
) -> Iterator[AdapterServer]:
    token = secrets.token_hex(16)
    bucket = f"lpx-rest-{uuid.uuid4().hex[:10]}"
    moto.client().create_bucket(Bucket=bucket)
    with fresh_database() as url:
        config = GatewaySettings(
            database_url=url,
            admin_token=token,
            secret_key=secrets.token_hex(32),
            key_cache_ttl_s=0.5,
            model=str(model_dir),
            object_store_url=f"s3://{bucket}/{PREFIX}",
            s3_endpoint_url=moto.url,
            adapter_cache_dir=cache_dir,
            **{"data_dir": Path(tempfile.mkdtemp(prefix="lpx-rest-")), **settings},
        )
        factory = None if engine_factory is None else (lambda: engine_factory(config))
        with live_server(create_app(config, engine_factory=factory)) as base:
            if engine_factory is not None:
                with httpx.Client(base_url=base) as probe:
                    wait_until(lambda: probe.get("/ready").status_code == 200, 120)
            yield AdapterServer(base, url, token, bucket, moto, cache_dir)


def peft_files(directory: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [
        ("files", (name, (directory / name).read_bytes()))
        for name in ("adapter_config.json", "adapter_model.safetensors")
    ]


def upload(
    client: httpx.Client, tenant: str, name: str, files: list[tuple[str, tuple[str, bytes]]]
) -> httpx.Response:
    return client.post(f"/admin/v1/tenants/{tenant}/adapters", data={"name": name}, files=files)


def make_tenant(client: httpx.Client, *scopes: str) -> tuple[str, str | None]:
    """A new tenant, and an API key with ``scopes`` when any are given."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    r = client.post("/admin/v1/tenants", json={"name": name})
    assert r.status_code == 201, r.text
    if not scopes:
        return name, None
    r = client.post(f"/admin/v1/tenants/{name}/keys", json={"scopes": list(scopes)})
    assert r.status_code == 201, r.text
    return name, r.json()["key"]
