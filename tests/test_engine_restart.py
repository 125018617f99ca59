"""``loraplex serve`` when its engine process is killed (SIGKILL) under live streams: the
streams end with an error event, new requests get a fast 503, ``/ready`` says so, the
supervisor starts a new engine, serving resumes, and the ledger holds every request once.
The same when the engine runs tensor-parallel (2 ranks on CPU) and one of its worker ranks
is killed: the engine process notices, fails its requests and exits."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from test_serve import secret_after, serving, wait_ready


def engine_pid(supervisor: int) -> int | None:
    for child in psutil.Process(supervisor).children(recursive=True):
        try:
            if "engine" in child.cmdline():
                return child.pid
        except psutil.Error:
            continue
    return None


def stream(
    url: str, key: str, out: dict[str, list[dict]], name: str, started: threading.Event
) -> None:
    body = {"model": "dummy:tiny", "prompt": "Once upon a time", "max_tokens": 2000,
            "min_tokens": 2000, "ignore_eos": True, "stream": True}  # fmt: skip
    events: list[dict] = []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers,
                      timeout=60) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append({"done": True} if line == "data: [DONE]" else json.loads(line[6:]))
                started.set()
    out[name] = events


def tp_worker(engine: int) -> psutil.Process:
    """A tensor-parallel worker rank of the engine process (a child of its fork server)."""
    for p in psutil.Process(engine).children(recursive=True):
        parent = p.parent()
        if (
            parent is not None
            and parent.pid != engine
            and "forkserver" in " ".join(parent.cmdline())
        ):
            return p
    raise AssertionError("no tensor-parallel worker process")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("victim", ["engine", "tp-rank"])
def test_killed_engine_fails_streams_then_comes_back(
    tmp_path: Path, free_port: int, victim: str
) -> None:
    data = tmp_path / "data"
    args = ["--model", "dummy:tiny", "--device", "cpu", "--workers", "1", "--data-dir", str(data)]
    if victim == "tp-rank":
        args += ["--tensor-parallel-size", "2"]
    env = {"LORAPLEX_KV_CACHE_BYTES": str(64 << 20), "LORAPLEX_MAX_MODEL_LEN": "4096"}
    with serving(args, free_port, tmp_path, env) as s:
        wait_ready(s)
        key = secret_after(s.output(), "API key:")
        assert key is not None
        supervisor = next(
            p.pid for p in psutil.process_iter(["cmdline"])
            if f"--port {free_port}" in " ".join(p.info["cmdline"] or []) and "serve" in p.info["cmdline"]
        )  # fmt: skip
        first = engine_pid(supervisor)
        assert first is not None
        streams: dict[str, list[dict]] = {}
        started = [threading.Event() for _ in range(3)]
        threads = [threading.Thread(target=stream, args=(s.url, key, streams, f"s{i}", started[i]))
                   for i in range(3)]  # fmt: skip
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started)  # every stream is getting tokens
        killed = psutil.Process(first) if victim == "engine" else tp_worker(first)
        killed.send_signal(signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert set(streams) == {"s0", "s1", "s2"}
        for events in streams.values():  # an error event, then [DONE]
            assert events[-1] == {"done": True}, events[-3:]
            assert "error" in events[-2], events[-3:]
            assert events[-2]["error"]["type"] == "service_unavailable"

        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "dummy:tiny", "prompt": "Hi", "max_tokens": 2}
        t0 = time.monotonic()
        r = httpx.post(f"{s.url}/v1/completions", json=body, headers=headers, timeout=30)
        # the supervisor waits a second before it restarts the engine, which then loads
        assert r.status_code == 503, r.text
        assert time.monotonic() - t0 < 2 and r.headers.get("retry-after")
        assert r.json()["error"]["code"] == "engine_unavailable"
        assert httpx.get(f"{s.url}/ready").json()["checks"]["engine"] != "ok"
        wait_ready(s, 120)  # restarted by the supervisor
        second = engine_pid(supervisor)
        assert second is not None and second != first
        r = httpx.post(f"{s.url}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        served = r.json()["id"]

        ids = [ev["id"] for events in streams.values() for ev in events if "id" in ev]
        stream_ids = set(ids)
        assert len(stream_ids) == 3
        deadline = time.monotonic() + 30
        while True:  # the ledger writer drains the outbox into the database
            with sqlite3.connect(data / "loraplex.db") as db:
                rows = db.execute("SELECT request_id, status FROM usage_records").fetchall()
            got = {rid: st for rid, st in rows if rid in stream_ids | {served}}
            if len(got) == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert len(rows) == len({rid for rid, _ in rows})  # each request once
        assert {got[i] for i in stream_ids} == {"error"} and got[served] == "ok", got
