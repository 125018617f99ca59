"""The database goes away under a serving gateway: requests keep being served (keys are
cached), their usage waits in the outbox, and once the database is back the ledger holds
each request exactly once with the usage the API returned."""

from __future__ import annotations

import asyncio
import secrets
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from billing_helpers import TcpProxy
from sqlalchemy.engine import make_url

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.gateway.live import (
    BASE,
    Gateway,
    free_port,
    fresh_database,
    live_server,
    ok,
    wait_until,
)


class ThreadedProxy:
    """A ``TcpProxy`` on an event loop of its own (the servers run in other threads)."""

    def __init__(self, host: str, port: int) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._proxy = TcpProxy(host, port, self.port)

    def _run(self, coro) -> None:  # type: ignore[no-untyped-def]
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def restore(self) -> None:
        self._run(self._proxy.restore())

    def cut(self) -> None:
        self._run(self._proxy.cut())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def served(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, ThreadedProxy]]:
    token = secrets.token_hex(16)
    config = EngineConfig(device="cpu", max_num_seqs=16, num_gpu_blocks=256, max_loras=2)
    with fresh_database() as url:
        real = make_url(url)
        proxy = ThreadedProxy(real.host or "127.0.0.1", real.port or 5432)
        proxy.restore()
        proxied = real.set(port=proxy.port).render_as_string(hide_password=False)
        settings = GatewaySettings(
            database_url=proxied,
            admin_token=token,
            secret_key=secrets.token_hex(32),
            data_dir=tmp_path_factory.mktemp("gw"),
            served_model_name=BASE,
            model=str(tiny_llama_dir),
            key_cache_ttl_s=600,
        )
        app = create_app(
            settings, engine_factory=lambda: AsyncEngine.from_model(str(tiny_llama_dir), config)
        )
        try:
            with live_server(app) as base:
                gw = Gateway(url=base, app=app, database_url=url, admin_token=token)
                with httpx.Client() as probe:
                    wait_until(lambda: probe.get(f"{base}/ready").status_code == 200, 120)
                yield gw, proxy
        finally:
            proxy.close()


def metric(gw: Gateway, name: str) -> float:
    for line in httpx.get(f"{gw.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_database_outage_under_traffic(served: tuple[Gateway, ThreadedProxy]) -> None:
    gw, proxy = served
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    with gw.admin() as admin:
        ok(admin.post("/admin/v1/tenants", json={"name": tenant}))
        key = ok(admin.post(f"/admin/v1/tenants/{tenant}/keys", json={"scopes": ["inference"]}))
    body = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    returned: dict[str, tuple[int, int]] = {}

    def call(client: httpx.Client) -> None:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        returned[r.json()["id"]] = (u["prompt_tokens"], u["completion_tokens"])

    headers = {"Authorization": f"Bearer {key['key']}"}
    with httpx.Client(base_url=gw.url, headers=headers, timeout=60) as client:
        call(client)  # the key is now cached
        wait_until(lambda: len(ledger(gw, tenant)) == 1, 30)
        proxy.cut()
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
