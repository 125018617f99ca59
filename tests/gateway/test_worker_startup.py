"""A gateway worker's startup waits for its engine (connected, tokenizer loaded) before the
server takes requests: uvicorn hands a new worker connections as soon as its startup is
done, so without the wait the first requests of a worker that replaces a dead one were
refused with 503 engine_unavailable while its siblings could have served them. With no
engine to reach, startup goes on after the wait and /ready says why."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from harness.engines import engine_process
from harness.services import free_port, wait_port

from loraplex.engine.remote_client import RemoteEngineClient
from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings
from loraplex.tenancy import api_keys, tenants
from loraplex.tenancy.db import make_engine, make_sessionmaker
from tests.gateway.live import fresh_database, live_server

SECRET = secrets.token_hex(32)


def settings_for(url: str, data_dir: Path, model: str) -> GatewaySettings:
    return GatewaySettings(
        database_url=url,
        secret_key=SECRET,
        admin_token=secrets.token_hex(16),
        data_dir=data_dir,
        model=model,
    )


async def issue_key(url: str) -> str:
    db = make_engine(url)
    try:
        async with make_sessionmaker(db)() as s:
            await tenants.create_tenant(s, name="acme", actor="test")
            issued = await api_keys.create_key(
                s, "acme", secret_key=SECRET, actor="test", scopes=["inference"]
            )
        return issued.key
    finally:
        await db.dispose()


async def engine_up(address: str, timeout_s: float = 120.0) -> None:
    probe = RemoteEngineClient(address)
    await probe.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not probe.health().ready:
            assert time.monotonic() < deadline, probe.health()
            await asyncio.sleep(0.1)
    finally:
        await probe.close()


def test_a_new_worker_serves_its_first_request(tmp_path: Path) -> None:
    """A worker process as ``loraplex serve`` runs them (a fresh interpreter: its engine
    client imports the tokenizer's libraries when the engine says hello), started beside a
    running engine; the first request it accepts is answered 200."""
    root = Path(tempfile.mkdtemp(prefix="lpx-", dir="/tmp"))  # short: an ipc socket
    with fresh_database() as url:
        settings = settings_for(url, root / "data", "dummy:tiny")
        key = asyncio.run(issue_key(url))
        with engine_process(settings, device="cpu") as engine:
            asyncio.run(engine_up(engine.address))  # the engine's own start is not at issue
            port = free_port()
            argv = [sys.executable, "-m", "uvicorn", "loraplex.gateway.worker:create_worker_app",
                    "--factory", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
            env = {**engine.env, "LORAPLEX_ENGINE_URL": engine.address}
            worker = subprocess.Popen(argv, env=env)
            try:
                # uvicorn listens once the app's startup is done: the first connection
                # that gets through is the first request this worker takes
                assert wait_port("127.0.0.1", port, 120), "the worker never listened"
                body = {"model": "dummy:tiny", "prompt": "Hello", "max_tokens": 2}
                auth = {"Authorization": f"Bearer {key}"}
                url_ = f"http://127.0.0.1:{port}/v1/completions"
                r = httpx.post(url_, json=body, headers=auth, timeout=60)
                assert r.status_code == 200, r.text
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(30)


def test_with_no_engine_startup_goes_on_after_the_wait(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    nowhere = f"ipc://{tempfile.mkdtemp(prefix='lpx-', dir='/tmp')}/no-engine.sock"
    with fresh_database() as url:
        settings = settings_for(url, tmp_path, str(tiny_llama_dir))
        app = create_app(
            settings, engine_factory=lambda: RemoteEngineClient(nowhere), engine_wait_s=1.0
        )
        t0 = time.monotonic()
        with live_server(app) as base:
            started_s = time.monotonic() - t0
            assert httpx.get(f"{base}/health").status_code == 200
            ready = httpx.get(f"{base}/ready")
            assert ready.status_code == 503 and ready.json()["checks"]["engine"] != "ok"
        assert started_s >= 1.0
