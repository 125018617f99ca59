"""Gateway tests: a real uvicorn server running the tiny Llama, over a fresh PostgreSQL
database, with two tenants, their keys and adapters made through the admin API. One server
per test module and engine kind: every gateway test runs against the in-process engine
client and against an engine server in a process of its own (the remote client)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness.engines import engine_process

from loraplex.engine.config import EngineConfig
from loraplex.engine.remote_client import RemoteEngineClient
from loraplex.engine_wiring import inproc_engine
from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings
from tests.gateway.live import BASE, Gateway, fresh_database, live_server, ok, wait_until


def _upload(admin: httpx.Client, tenant: str, name: str, adapter_dir: Path) -> dict[str, Any]:
    files = [
        (p, (p, (adapter_dir / p).read_bytes(), "application/octet-stream"))
        for p in ("adapter_config.json", "adapter_model.safetensors")
    ]
    return ok(admin.post(f"/admin/v1/tenants/{tenant}/adapters", data={"name": name}, files=files))


def _setup(gw: Gateway, lora_a: Path, lora_b: Path) -> None:
    suffix = uuid.uuid4().hex[:6]
    with gw.admin() as admin:
        for role in ("a", "b"):
            gw.tenants[role] = name = f"{role}-corp-{suffix}"
            ok(admin.post("/admin/v1/tenants", json={"name": name}))
        a, b = gw.tenants["a"], gw.tenants["b"]

        def key(role: str, tenant: str, scopes: list[str]) -> dict[str, Any]:
            issued = ok(admin.post(f"/admin/v1/tenants/{tenant}/keys", json={"scopes": scopes}))
            gw.keys[role] = issued["key"]
            return issued

        key("a", a, ["inference", "adapters:read"])
        key("b", b, ["inference"])
        key("a_read_only", a, ["adapters:read"])
        revoked = key("a_revoked", a, ["inference"])
        ok(admin.delete(f"/admin/v1/tenants/{a}/keys/{revoked['id']}"))
        expired = key("a_expired", a, ["inference"])
        gw.tenants["s"] = suspended = f"s-corp-{suffix}"
        ok(admin.post("/admin/v1/tenants", json={"name": suspended}))
        key("s", suspended, ["inference"])
        ok(admin.patch(f"/admin/v1/tenants/{suspended}", json={"status": "suspended"}))

        _upload(admin, a, "support", lora_a)  # support@1
        _upload(admin, a, "support", lora_b)  # support@2, current
        ok(admin.put(f"/admin/v1/tenants/{a}/adapters/support/aliases/prod", json={"version": 1}))
        _upload(admin, b, "globex-secret", lora_b)
    past = datetime.now(UTC) - timedelta(minutes=1)
    gw.sql("UPDATE api_keys SET expires_at = %s WHERE id = %s", past, uuid.UUID(expired["id"]))


@pytest.fixture(scope="module")
def served_model_name() -> str:
    """The base model's API name; a module may override this fixture."""
    return BASE


@pytest.fixture(scope="module")
def max_body_bytes() -> int:
    """The server's body limit (small, so that tests reach it quickly); a module may
    override this fixture (the abuse suite runs at the production default, 4 MiB)."""
    return 256 * 1024


@pytest.fixture(scope="module", params=["inproc", "remote"])
def gateway(
    request: pytest.FixtureRequest,
    served_model_name: str,
    max_body_bytes: int,
    tiny_llama_dir: Path,
    make_peft_adapter: Callable[..., Path],
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("gateway-data")
    admin_token = secrets.token_hex(16)
    lora_a = make_peft_adapter(tiny_llama_dir, rank=8, seed=1)
    lora_b = make_peft_adapter(tiny_llama_dir, rank=4, seed=2)
    config = EngineConfig(device="cpu", max_num_seqs=8, num_gpu_blocks=256, max_loras=2)
    with fresh_database() as url:
        settings = GatewaySettings(
            database_url=url,
            redis_url=redis_url,  # the limiter's counters
            admin_token=admin_token,
            secret_key=secrets.token_hex(32),
            data_dir=data_dir,
            served_model_name=served_model_name,
            model=str(tiny_llama_dir),
            key_cache_ttl_s=1.0,
            max_body_bytes=max_body_bytes,
        )
        with ExitStack() as stack:
            proc = None
            if request.param == "inproc":
                factory = lambda: inproc_engine(settings, str(tiny_llama_dir), config)  # noqa: E731
            else:
                proc = stack.enter_context(
                    engine_process(settings, device="cpu", max_num_seqs=8, max_loras=2)
                )
                factory = lambda: RemoteEngineClient(proc.address)  # noqa: E731
            app = create_app(settings, engine_factory=factory)
            base_url = stack.enter_context(live_server(app))
            gw = Gateway(url=base_url, app=app, database_url=url, admin_token=admin_token,
                         engine_proc=proc)  # fmt: skip
            with httpx.Client(base_url=base_url) as probe:
                ready = lambda: probe.get("/ready")  # noqa: E731
                try:
                    wait_until(lambda: ready().status_code == 200, 120)
                except TimeoutError:
                    raise TimeoutError(f"not ready: {ready().text}") from None
            _setup(gw, lora_a, lora_b)
            yield gw
