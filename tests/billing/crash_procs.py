"""The server side of the crash-consistency test, as real processes: an engine server
(``loraplex engine``) and ``loraplex gateway --workers N`` in front of it, in a process group
(session) of its own so that one ``killpg`` takes all of it (uvicorn's supervisor, its
workers, the limits broker) at once; restartable as systemd or Kubernetes would restart it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from harness.cli import loraplex_argv

from loraplex.gateway.worker import die_with_parent


def start_engine(address: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``loraplex engine`` at ``address``; it stops by itself when this process is gone."""
    argv = [*loraplex_argv(), "engine", "--listen", address, "--parent-pid", str(os.getpid())]
    with log.open("w") as sink:
        return subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)


def _children(pid: int) -> list[int]:
    """A process's children, from /proc (psutil's ``children()`` reads every process)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@dataclass
class Gateway:
    root: Path
    env: dict[str, str]
    port: int
    workers_n: int
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _killed: list[int] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log = self.root / f"gateway-{self.starts}.log"
        self.logs.append(log)
        argv = [*loraplex_argv(), "gateway", "--port", str(self.port),
                "--workers", str(self.workers_n)]  # fmt: skip
        with log.open("w") as sink:
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for killpg
                preexec_fn=die_with_parent,  # and gone with the test run, however it ends
            )

    def workers(self) -> list[int]:
        """The pids of the running worker processes (uvicorn spawns them)."""
        assert self.proc is not None
        pids = []
        for pid in _children(self.proc.pid):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                    pids.append(pid)
        return sorted(pids)

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in self.logs[-2:])

    def wait_serving(self, timeout_s: float = 240.0) -> None:
        """Until a worker serves: /ready answers 200 (twice in a row). A worker takes
        connections only once it has reached the engine, so any answer comes from one that
        serves; others (replacements of killed ones) may still be starting."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        state, in_a_row = "", 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(f"{self.url}/ready", timeout=10)
                in_a_row, state = (in_a_row + 1 if r.status_code == 200 else 0), r.text
                if in_a_row == 2:
                    return
            except httpx.HTTPError as exc:
                in_a_row, state = 0, repr(exc)
            time.sleep(0.05 if in_a_row else 0.2)
        raise AssertionError(f"gateway not serving after {timeout_s}s ({state}):\n{self.output()}")

    def busiest_worker(self, pick: float) -> int:
        """The worker holding the most client connections now (``pick`` in [0, 1) chooses
        among equals), so that a kill cuts requests off."""
        held: dict[int, int] = {}
        for pid in self.workers():
            with contextlib.suppress(psutil.Error):
                conns = psutil.Process(pid).net_connections(kind="tcp")
                held[pid] = sum(c.laddr.port == self.port and c.status == "ESTABLISHED"
                                for c in conns)  # fmt: skip
        most = max(held.values(), default=0)
        busiest = sorted(pid for pid, n in held.items() if n == most)
        return busiest[int(pick * len(busiest))]

    def kill_worker(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)  # uvicorn starts a replacement

    def kill_group(self) -> None:
        assert self.proc is not None
        self._killed = self.workers()
        os.killpg(self.proc.pid, signal.SIGKILL)

    def restart(self) -> None:
        """After ``kill_group``: reap it, see its workers gone, start it again."""
        assert self.proc is not None
        self.proc.wait(30)
        for pid in self._killed:  # killed with the group; their parent's parent reaps them
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                end = time.monotonic() + 10
                while p.status() != psutil.STATUS_ZOMBIE and time.monotonic() < end:
                    time.sleep(0.05)
        self.start()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
