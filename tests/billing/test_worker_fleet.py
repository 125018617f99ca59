"""Three real gateway worker processes over one data dir, one database, one engine process
and one limits broker (hosted here, as the supervisor of `loraplex serve` hosts it), each
worker on a port of its own so the test can address and kill each one.

Background jobs run in exactly one worker, and move to another when it is killed, with
the ledger exact throughout; a tenant's limits hold exactly across the workers; a broker
that goes away makes rates fail open and budgets fail closed (fast), and limits apply
again once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from harness.workers import Fleet, Worker, start_fleet, stop_fleet

from loraplex.gateway.limits_broker import LimitsBroker
from tests.gateway.live import fresh_database, ok, wait_until

LEADER = "loraplex_background_jobs_leader"
WRITTEN = "loraplex_ledger_records_written_total"
UNAVAILABLE_BUDGET = 'loraplex_limiter_unavailable_total{check="budget",outcome="rejected"}'
BODY = {"model": "dummy:tiny", "prompt": [5, 6, 7, 8], "max_tokens": 1}


@dataclass
class Served:
    fleet: Fleet
    broker: LimitsBroker
    data_dir: Path
    database_url: str
    admin_token: str

    def tenant(
        self, limits: dict[str, Any] | None = None, key: dict[str, Any] | None = None
    ) -> str:
        """A new tenant with one inference key; returns the key."""
        name = f"t-{uuid.uuid4().hex[:8]}"
        with httpx.Client(base_url=self.fleet.alive()[0].url, timeout=30) as c:
            auth = {"Authorization": f"Bearer {self.admin_token}"}
            ok(
                c.post(
                    "/admin/v1/tenants", json={"name": name, "limits": limits or {}}, headers=auth
                )
            )
            body = {"scopes": ["inference"], "limits": key or {}}
            issued = ok(c.post(f"/admin/v1/tenants/{name}/keys", json=body, headers=auth))
        return str(issued["key"])

    def leaders(self) -> list[Worker]:
        return [w for w in self.fleet.alive() if w.metric(LEADER) == 1]

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        url = self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        with psycopg.connect(url, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    def ledger(self, ids: set[str]) -> dict[str, int]:
        """How many times each of these requests is in the ledger."""
        query = (
            "SELECT request_id, count(*) FROM usage_records WHERE request_id = ANY(%s) "
            "GROUP BY request_id"
        )
        return {r[0]: r[1] for r in self.sql(query, list(ids))}

    def ledger_size(self) -> int:
        return int(self.sql("SELECT count(*) FROM usage_records")[0][0])

    def outbox_size(self) -> int:
        (path,) = self.data_dir.glob("usage-outbox-*.sqlite")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def lock_holder(self) -> str:
        return next(self.data_dir.glob("usage-outbox-*.sqlite.leader")).read_text().strip()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    root = Path(tempfile.mkdtemp(prefix="lpx-fleet-"))  # short: it holds ipc sockets
    token = secrets.token_hex(16)
    broker = LimitsBroker(f"ipc://{root}/limits.sock")
    broker.start()
    served: Served | None = None
    try:
        with fresh_database() as url:
            settings = {
                "LORAPLEX_DATABASE_URL": url,
                "LORAPLEX_SECRET_KEY": secrets.token_hex(32),
                "LORAPLEX_ADMIN_TOKEN": token,
                "LORAPLEX_DATA_DIR": str(root / "data"),
                "LORAPLEX_LIMITS_BROKER_URL": broker.address,
            }
            fleet = start_fleet(root, settings, 3)
            served = Served(fleet, broker, root / "data", url, token)
            try:
                yield served
            finally:
                stop_fleet(fleet)
    finally:
        (served.broker if served is not None else broker).stop()
        shutil.rmtree(root, ignore_errors=True)


def fire(workers: list[Worker], key: str, n: int) -> list[httpx.Response]:
    """``n`` concurrent completions, dealt round-robin over ``workers``."""

    async def go() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {key}"}
        clients = [httpx.AsyncClient(base_url=w.url, headers=headers, timeout=60) for w in workers]
        try:
            calls = (clients[i % len(clients)].post("/v1/completions", json=BODY) for i in range(n))
            return list(await asyncio.gather(*calls))
        finally:
            for c in clients:
                await c.aclose()

    return asyncio.run(go())


def ids_of(responses: list[httpx.Response]) -> set[str]:
    return {r.json()["id"] for r in responses if r.status_code == 200}


def test_requests_per_minute_hold_exactly_across_workers(served: Served) -> None:
    key = served.tenant(key={"requests_per_minute": 12})
    codes = [r.status_code for r in fire(served.fleet.alive(), key, 45)]
    assert (codes.count(200), codes.count(429)) == (12, 33), codes


def test_one_worker_runs_the_background_jobs(served: Served) -> None:
    (leader,) = served.leaders()
    assert served.lock_holder() == str(leader.pid)
    workers = served.fleet.alive()

    def settled() -> bool:  # earlier tests' usage all written, and counted
        return served.outbox_size() == 0 and (
            sum(w.metric(WRITTEN) for w in workers) == served.ledger_size()
        )

    wait_until(settled, 30)
    before = {w.pid: w.metric(WRITTEN) for w in workers}
    ids = ids_of(fire(workers, served.tenant(), 30))
    assert len(ids) == 30
    wait_until(lambda: served.ledger(ids) == dict.fromkeys(ids, 1), 30)
    wait_until(lambda: leader.metric(WRITTEN) - before[leader.pid] >= 30, 5)
    written = {w.pid: w.metric(WRITTEN) - before[w.pid] for w in workers}
    assert written == {w.pid: 30.0 if w is leader else 0.0 for w in workers}


def test_a_killed_leader_hands_the_jobs_over(served: Served) -> None:
    key = served.tenant()
    ids = ids_of(fire(served.fleet.alive(), key, 24))  # some may still be in the outbox
    (leader,) = served.leaders()
    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait(10)
    killed = time.monotonic()
    wait_until(lambda: len(served.leaders()) == 1, 15)
    took_over_s = time.monotonic() - killed
    (successor,) = served.leaders()
    assert served.lock_holder() == str(successor.pid)
    ids |= ids_of(fire(served.fleet.alive(), key, 10))
    assert len(ids) == 34
    wait_until(lambda: served.ledger(ids) == dict.fromkeys(ids, 1), 30)
    assert took_over_s < 5, took_over_s


def test_broker_down_rates_open_budgets_closed_then_back(served: Served) -> None:
    workers = served.fleet.alive()
    rated = served.tenant(key={"requests_per_minute": 2})
    budgeted = served.tenant({"monthly_token_budget": 1000})
    served.broker.stop()
    try:
        started = time.monotonic()
        codes = [r.status_code for r in fire(workers, rated, 6)]
        assert codes == [200] * 6  # rates fail open
        for w in workers * 2:
            t0 = time.monotonic()
            r = answer(w, budgeted)
            assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
            assert time.monotonic() - t0 < 1.0, "a refusal must not wait on the broker"
        assert time.monotonic() - started < 10
        refused = sum(w.metric(UNAVAILABLE_BUDGET) for w in workers)
        assert refused == 2 * len(workers)  # counted by the workers that answered
    finally:
        served.broker = LimitsBroker(served.broker.address)  # a supervisor restart: fresh
        served.broker.start()
    for w in workers:  # each reconnects (and its breaker lets it try again) within seconds
        wait_until(lambda w=w: answer(w, budgeted).status_code == 200, 15)
    codes = [r.status_code for r in fire(workers, rated, 9)]
    assert (codes.count(200), codes.count(429)) == (2, 7), codes


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def answer(worker: Worker, key: str) -> httpx.Response:
    return httpx.post(f"{worker.url}/v1/completions", json=BODY, headers=auth(key), timeout=30)
