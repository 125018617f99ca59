"""Stores go away under a serving gateway. The database: requests keep being served (keys
are cached), their usage waits in the outbox, and once the database is back the ledger
holds each request exactly once with the usage the API returned. Redis: request rates
fail open, budgets fail closed (503), both counted; limits apply again once it is back."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from harness.tcp_proxy import ThreadedProxy
from sqlalchemy.engine import make_url

from loraplex.engine.config import EngineConfig
from loraplex.engine_wiring import inproc_engine
from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings
from tests.gateway.live import (
    BASE,
    Gateway,
    fresh_database,
    live_server,
    ok,
    wait_until,
)


@dataclass
class Served:
    gw: Gateway
    db: ThreadedProxy
    redis: ThreadedProxy


@pytest.fixture(scope="module")
def served(
    tiny_llama_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    token = secrets.token_hex(16)
    config = EngineConfig(device="cpu", max_num_seqs=16, num_gpu_blocks=256, max_loras=2)
    with fresh_database() as url:
        real = make_url(url)
        proxy = ThreadedProxy(real.host or "127.0.0.1", real.port or 5432)
        proxied = real.set(port=proxy.port).render_as_string(hide_password=False)
        redis_parts = urlsplit(redis_url)
        redis_proxy = ThreadedProxy(redis_parts.hostname or "127.0.0.1", redis_parts.port or 6379)
        settings = GatewaySettings(
            database_url=proxied,
            redis_url=f"redis://127.0.0.1:{redis_proxy.port}{redis_parts.path}",
            limits_budget_sync_s=0,
            admin_token=token,
            secret_key=secrets.token_hex(32),
            data_dir=tmp_path_factory.mktemp("gw"),
            served_model_name=BASE,
            model=str(tiny_llama_dir),
            key_cache_ttl_s=600,
        )
        app = create_app(
            settings, engine_factory=lambda: inproc_engine(settings, str(tiny_llama_dir), config)
        )
        try:
            with live_server(app) as base:
                gw = Gateway(url=base, app=app, database_url=url, admin_token=token)
                with httpx.Client() as probe:
                    wait_until(lambda: probe.get(f"{base}/ready").status_code == 200, 120)
                yield Served(gw, proxy, redis_proxy)
        finally:
            proxy.close()
            redis_proxy.close()


def metric(gw: Gateway, name: str) -> float:
    for line in httpx.get(f"{gw.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


BODY = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def new_key(gw: Gateway, limits: dict[str, int] | None = None) -> tuple[str, str]:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    with gw.admin() as admin:
        ok(admin.post("/admin/v1/tenants", json={"name": tenant, "limits": limits or {}}))
        key = ok(admin.post(f"/admin/v1/tenants/{tenant}/keys", json={"scopes": ["inference"]}))
    return tenant, key["key"]


def test_database_outage_under_traffic(served: Served) -> None:
    gw, proxy = served.gw, served.db
    tenant, key = new_key(gw)
    body = BODY
    returned: dict[str, tuple[int, int]] = {}

    def call(client: httpx.Client) -> None:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        returned[r.json()["id"]] = (u["prompt_tokens"], u["completion_tokens"])

    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=gw.url, headers=headers, timeout=60) as client:
        call(client)  # the key is now cached
        wait_until(lambda: len(ledger(gw, tenant)) == 1, 30)
        proxy.refuse()
        for _ in range(20):
            call(client)  # served while the database is away
        wait_until(lambda: metric(gw, "loraplex_ledger_pending_records") == 20, 30)
        assert metric(gw, "loraplex_ledger_lag_seconds") > 0
        assert metric(gw, "loraplex_ledger_write_errors_total") >= 1
        assert len(ledger(gw, tenant)) == 1
        proxy.restore()
        call(client)
    wait_until(lambda: len(ledger(gw, tenant)) == 22, 60)
    assert ledger(gw, tenant) == returned
    wait_until(lambda: metric(gw, "loraplex_ledger_pending_records") == 0, 30)


def ledger(gw: Gateway, tenant: str) -> dict[str, tuple[int, int]]:
    rows = gw.sql(
        "SELECT request_id, prompt_tokens, completion_tokens FROM usage_records u "
        "JOIN tenants t ON t.id = u.tenant_id WHERE t.name = %s",
        tenant,
    )
    return {r[0]: (r[1], r[2]) for r in rows}


def test_redis_outage_rates_fail_open_budgets_fail_closed(served: Served) -> None:
    gw = served.gw
    _, rated = new_key(gw, {"requests_per_minute": 2})
    _, budgeted = new_key(gw, {"monthly_token_budget": 100_000})

    def post(key: str) -> httpx.Response:
        with httpx.Client(base_url=gw.url, timeout=60) as c:
            return c.post(
                "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}
            )

    for key in (rated, budgeted):
        assert post(key).status_code == 200  # keys cached, limits checked in Redis
    served.redis.refuse()
    try:
        for _ in range(4):  # over the 2 a minute: let through unchecked
            assert post(rated).status_code == 200
        refused = post(budgeted)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "service_unavailable"
        text = httpx.get(f"{gw.url}/metrics").text
        assert 'loraplex_limiter_unavailable_total{check="rate",outcome="admitted"} 4.0' in text
        assert 'loraplex_limiter_unavailable_total{check="budget",outcome="rejected"} 1.0' in text
    finally:
        served.redis.restore()
    # Back: after the retry period the limiter checks Redis again (1 of 2 already counted).
    wait_until(lambda: post(budgeted).status_code == 200, 10)
    codes = [post(rated).status_code for _ in range(2)]
    assert codes == [200, 429]
