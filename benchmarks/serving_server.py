"""``loraplex serve`` as the benchmark's subprocess, and reading a server's ``/metrics``.

The server gets a fresh data directory and its settings as ``LORAPLEX_*`` variables (none
inherited from this process). The admin token comes from the first-start banner on its
stdout. Stopping it: SIGTERM to the supervisor (which stops its gateway workers, then the
engine), then a check that none of the processes it had started is left.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def loraplex_argv() -> list[str]:
    """The installed console script, else the module (a checkout without ``pip install``)."""
    script = Path(sys.executable).with_name("loraplex")
    return [str(script)] if script.exists() else [sys.executable, "-m", "loraplex.main"]


def child_env(settings: dict[str, str], repo: Path = REPO) -> dict[str, str]:
    """This environment without LORAPLEX_* variables, plus ``settings`` and the repo on
    PYTHONPATH (for a checkout that is not installed, as on the GPU machine; ``repo``
    another checkout: its code runs, e.g. a baseline tree)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **settings}


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class ServeProcess:
    url: str
    log: Path
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(
        cls,
        settings: dict[str, str],
        data_dir: Path,
        *,
        argv: list[str] | None = None,
        repo: Path = REPO,
    ) -> ServeProcess:
        """``argv``: another server command than ``loraplex serve`` (the same settings);
        ``repo``: the checkout whose code it runs."""
        data_dir.mkdir(parents=True, exist_ok=True)
        log = data_dir / "serve.log"
        env = child_env({**settings, "LORAPLEX_DATA_DIR": str(data_dir)}, repo)
        with log.open("wb") as sink:  # the child holds its own descriptor
            proc = subprocess.Popen(
                argv or [*loraplex_argv(), "serve"],
                cwd=data_dir,  # no .env of the caller's
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop it
            )
        host = settings.get("LORAPLEX_HOST", "127.0.0.1")
        return cls(f"http://{host}:{settings['LORAPLEX_PORT']}", log, proc)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, n: int) -> list[str]:
        """The log's last ``n`` lines but probes and successful requests (access lines),
        and the banner's secrets."""
        quiet = re.compile(
            r'"(GET|POST) (/ready|/metrics|\S+ HTTP/1.1" 20[01] )|API key:|Admin token:'
        )
        return [x for x in self.output().splitlines() if not quiet.search(x)][-n:]

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            tail = "\n".join(self.output().splitlines()[-40:])
            raise RuntimeError(f"loraplex serve exited {self.proc.returncode}:\n{tail}")

    def admin_token(self, timeout_s: float) -> str:
        """The admin token from the first-start banner."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if line.strip().startswith("Admin token:"):
                    return line.split("Admin token:", 1)[1].strip()
            self._check_running()
            time.sleep(0.1)
        raise RuntimeError(f"no admin token in serve's output after {timeout_s}s")

    def wait_ready(self, timeout_s: float, workers: int) -> float:
        """Until ``/ready`` answers 200 several times in a row (each gateway worker has
        its own engine connection; the kernel spreads connections over them).
        -> seconds since the start."""
        deadline, in_a_row = time.monotonic() + timeout_s, 0
        with httpx.Client(timeout=5, trust_env=False) as http:
            while in_a_row < 3 * workers:
                self._check_running()
                if time.monotonic() > deadline:
                    tail = "\n".join(self.output().splitlines()[-30:])
                    raise RuntimeError(f"/ready not 200 after {timeout_s}s:\n{tail}")
                try:
                    ok = http.get(self.url + "/ready").status_code == 200
                except httpx.HTTPError:
                    ok = False
                in_a_row = in_a_row + 1 if ok else 0
                time.sleep(0.05 if ok else 0.25)
        return time.perf_counter() - self.started

    def stop(self, timeout_s: float = 60.0) -> dict:
        """SIGTERM, wait, then check that nothing it started is left (killing what is)."""
        if self.proc.poll() is not None:
            return {"exit_code": self.proc.returncode, "stop_s": 0.0, "left_running": []}
        started = descendants(self.proc.pid)
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        deadline = time.monotonic() + 10  # the engine notices its parent is gone
        while any(alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in started if alive(p)]
        for pid in left:  # ours: started by the server we started
            os.kill(pid, signal.SIGKILL)
        return {"exit_code": rc, "stop_s": time.perf_counter() - t0, "left_running": left}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
