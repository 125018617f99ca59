"""Gateway workers as ``loraplex serve`` runs them, but each on a port of its own so a test
can address (and kill) one: an engine server process (``loraplex engine``) and N
``uvicorn gateway.worker:create_worker_app`` processes sharing one data dir, one database
and the settings given (a limits broker's address, say)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness.cli import clean_env, loraplex_argv
from harness.services import free_port


@dataclass
class Worker:
    url: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metric(self, name: str) -> float:
        """A sample of this worker's own /metrics (0 when absent)."""
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0


@dataclass
class Fleet:
    engine: subprocess.Popen[bytes] | None
    workers: list[Worker]
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(self.logs.glob("*.log")))

    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as sink:
        return subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)


def start_fleet(
    root: Path,
    settings: dict[str, str],
    n: int,
    model: str = "dummy:tiny",
    engines: list[str] | None = None,
) -> Fleet:
    """The engine and ``n`` workers (ready when this returns); ``settings``: LORAPLEX_*.
    ``engines``: the addresses of engine replicas started already (the workers route over
    them, LORAPLEX_ENGINE_URLS); none is started here then."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    address = f"ipc://{root}/engine.sock"
    env = clean_env({"LORAPLEX_MODEL": model, "LORAPLEX_DEVICE": "cpu", **settings})
    engine = None
    if engines is None:
        engine = _spawn(
            [*loraplex_argv(), "engine", "--listen", address, "--parent-pid", str(os.getpid())],
            env,
            logs / "engine.log",
        )
    target = {"LORAPLEX_ENGINE_URLS": ",".join(engines)} if engines else {
        "LORAPLEX_ENGINE_URL": address}  # fmt: skip
    workers = []
    for i in range(n):
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "loraplex.gateway.worker:create_worker_app", "--factory",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
        proc = _spawn(argv, {**env, **target}, logs / f"worker{i}.log")
        workers.append(Worker(f"http://127.0.0.1:{port}", proc))
    procs = [engine] if engine is not None else []
    fleet = Fleet(engine, workers, logs, [*procs, *(w.proc for w in workers)])
    try:
        for w in workers:
            wait_ready(fleet, w, 120)
    except BaseException:
        stop_fleet(fleet)
        raise
    return fleet


def wait_ready(fleet: Fleet, worker: Worker, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        for p in fleet.procs:
            if p.poll() is not None and p.returncode != -signal.SIGKILL:
                raise AssertionError(f"a process exited {p.returncode}:\n{fleet.output()}")
        try:
            r = httpx.get(f"{worker.url}/ready", timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"{worker.url} not ready after {timeout_s}s ({last}):\n{fleet.output()}")


def stop_fleet(fleet: Fleet) -> None:
    for p in reversed(fleet.procs):  # the workers first: they meter their last requests
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(fleet.procs):
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
