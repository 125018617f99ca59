"""Without Redis the gateway uses the in-process limiter: the same semantics over HTTP."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loraplex.engine.config import EngineConfig
from loraplex.engine_wiring import inproc_engine
from loraplex.gateway.app import create_app
from loraplex.gateway.limiter_memory import InProcessLimiter
from loraplex.gateway.settings import GatewaySettings
from tests.gateway.live import BASE, Gateway, fresh_database, live_server, ok, wait_until


@pytest.fixture(scope="module")
def single(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    token = secrets.token_hex(16)
    config = EngineConfig(device="cpu", max_num_seqs=16, num_gpu_blocks=256, max_loras=2)
    with fresh_database() as url:
        settings = GatewaySettings(
            database_url=url,
            admin_token=token,
            secret_key=secrets.token_hex(32),
            data_dir=tmp_path_factory.mktemp("gw"),
            served_model_name=BASE,
            model=str(tiny_llama_dir),
        )
        app = create_app(
            settings, engine_factory=lambda: inproc_engine(settings, str(tiny_llama_dir), config)
        )
        with live_server(app) as base:
            gw = Gateway(url=base, app=app, database_url=url, admin_token=token)
            with httpx.Client() as probe:
                wait_until(lambda: probe.get(f"{base}/ready").status_code == 200, 120)
            yield gw


def test_in_process_limiter_admits_exactly_the_limit(single: Gateway) -> None:
    assert isinstance(single.services.limiter, InProcessLimiter)
    name = f"t-{uuid.uuid4().hex[:8]}"
    with single.admin() as admin:
        ok(admin.post("/admin/v1/tenants", json={"name": name}))
        key = ok(
            admin.post(
                f"/admin/v1/tenants/{name}/keys",
                json={"scopes": ["inference"], "limits": {"requests_per_minute": 10}},
            )
        )["key"]
    body = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}

    async def fire() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=single.url, headers=headers, timeout=120) as c:
            return list(
                await asyncio.gather(
                    *(c.post("/v1/chat/completions", json=body) for _ in range(40))
                )
            )

    responses = asyncio.run(fire())
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 10 and codes.count(429) == 30
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["message"].startswith("Rate limit reached for requests")
    assert "key limit 10" in refused.json()["error"]["message"]
    ids = {r.json()["id"] for r in responses if r.status_code == 200}
    wait_until(
        lambda: (
            {
                row[0]
                for row in single.sql(
                    "SELECT request_id FROM usage_records u JOIN tenants t ON t.id = u.tenant_id "
                    "WHERE t.name = %s",
                    name,
                )
            }
            == ids
        ),
        60,
    )
