"""``loraplex serve --workers 3`` on embedded defaults (no Redis): the supervisor's limits
broker makes a tenant's limits hold exactly across the worker processes, and one of them
runs the ledger writer, which meters each admitted request once."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness.cli import clean_env, loraplex_argv
from harness.services import free_port

WORKERS = 3
BODY = {"model": "dummy:tiny", "prompt": [5, 6, 7, 8], "max_tokens": 1}  # 5 tokens, always


@dataclass
class Served:
    url: str
    data: Path
    admin_token: str
    proc: subprocess.Popen[bytes]

    def key(self, tenant: dict[str, Any] | None = None, key: dict[str, Any] | None = None) -> str:
        name = f"t-{uuid.uuid4().hex[:8]}"
        auth = {"Authorization": f"Bearer {self.admin_token}"}
        with httpx.Client(base_url=self.url, headers=auth, timeout=30) as c:
            c.post(
                "/admin/v1/tenants", json={"name": name, "limits": tenant or {}}
            ).raise_for_status()
            r = c.post(
                f"/admin/v1/tenants/{name}/keys",
                json={"scopes": ["inference"], "limits": key or {}},
            )
            r.raise_for_status()
        return str(r.json()["key"])

    def ledger(self, ids: set[str]) -> dict[str, int]:
        with contextlib.closing(sqlite3.connect(self.data / "loraplex.db")) as db:
            marks = ",".join("?" * len(ids))
            rows = db.execute(
                f"SELECT request_id, count(*) FROM usage_records WHERE request_id IN ({marks}) "
                "GROUP BY request_id",
                sorted(ids),
            ).fetchall()
        return {r[0]: r[1] for r in rows}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serve-workers")
    port, log = free_port(), root / "serve.log"
    argv = [*loraplex_argv(), "serve", "--model", "dummy:tiny", "--workers", str(WORKERS),
            "--port", str(port), "--data-dir", str(root / "data")]  # fmt: skip
    with log.open("w") as sink:
        proc = subprocess.Popen(argv, cwd=root, env=clean_env(), stdout=sink, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        all_ready(url, proc, log)
        deadline = time.monotonic() + 30  # the secrets are printed once /ready answers
        while "loraplex ready on" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        token = re.search(r"Admin token:\s+(\S+)", log.read_text())
        assert token is not None, log.read_text()
        yield Served(url, root / "data", token.group(1), proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not list((root / "data").glob("limits-*.sock")), "the broker's socket outlived it"


def all_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    """Every worker has its engine: three rounds in a row of 30 concurrent /ready requests
    (each on a connection of its own, so they spread over the workers) all answer 200."""

    async def round_ok() -> bool:
        limits = httpx.Limits(max_connections=30, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as c:
            try:
                replies = await asyncio.gather(*(c.get("/ready") for _ in range(30)))
            except httpx.HTTPError:
                return False
        return all(r.status_code == 200 for r in replies)

    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < 3:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"serve not ready (exit {proc.poll()}):\n{log.read_text()}")
        streak = streak + 1 if asyncio.run(round_ok()) else 0
        if streak == 0:
            time.sleep(0.3)


def burst(served: Served, key: str, n: int) -> list[httpx.Response]:
    """``n`` concurrent completions, each on a connection of its own."""

    async def go() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=served.url, headers=headers, limits=limits,
                                     timeout=60) as c:  # fmt: skip
            return list(
                await asyncio.gather(*(c.post("/v1/completions", json=BODY) for _ in range(n)))
            )

    return asyncio.run(go())


def counts(responses: list[httpx.Response]) -> tuple[int, int]:
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, [r.text for r in responses if r.status_code not in (200, 429)]
    return codes.count(200), codes.count(429)


def test_requests_per_minute_across_workers(served: Served) -> None:
    responses = burst(served, served.key(key={"requests_per_minute": 10}), 40)
    assert counts(responses) == (10, 30)
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-limit-requests"] == "10"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 0 < float(refused.headers["retry-after"]) <= 60


def test_monthly_token_budget_across_workers_and_metered_once(served: Served) -> None:
    responses = burst(served, served.key({"monthly_token_budget": 50}), 40)
    assert counts(responses) == (10, 30)  # each uses exactly what it reserved: 5 tokens
    assert {r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200} == {5}
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "insufficient_quota"
    ids = {r.json()["id"] for r in responses if r.status_code == 200}
    leader = int(next(served.data.glob("usage-outbox-*.leader")).read_text())
    status = Path(f"/proc/{leader}/status").read_text()
    assert f"PPid:\t{served.proc.pid}\n" in status  # a live worker of this serve leads
    deadline = time.monotonic() + 30
    while served.ledger(ids) != dict.fromkeys(ids, 1):
        assert time.monotonic() < deadline, served.ledger(ids)
        time.sleep(0.2)


def test_max_concurrent_across_workers(served: Served) -> None:
    key = served.key(key={"max_concurrent": 3})
    long = {**BODY, "max_tokens": 2000, "temperature": 0, "stream": True}  # seconds of tokens
    lines = []  # each stream's line iterator, kept: dropping it would close the stream
    with contextlib.ExitStack() as held:
        for _ in range(3):
            client = held.enter_context(httpx.Client(base_url=served.url, timeout=60))
            auth = {"Authorization": f"Bearer {key}"}
            stream = held.enter_context(
                client.stream("POST", "/v1/completions", json=long, headers=auth)
            )
            assert stream.status_code == 200
            lines.append(stream.iter_lines())
            assert next(lines[-1]).startswith("data: ")  # generating: its slot is taken
        responses = burst(served, key, 30)
        assert counts(responses) == (0, 30)
        assert all("concurrent" in r.json()["error"]["message"] for r in responses)
    deadline = time.monotonic() + 30  # the streams were cut: their slots come back
    while counts(burst(served, key, 1)) != (1, 0):
        assert time.monotonic() < deadline
        time.sleep(0.2)
