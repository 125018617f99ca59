"""Engine servers as real processes for gateway tests: ``loraplex engine`` on an ipc://
socket, configured through ``LORAPLEX_*`` environment variables from the gateway's own
settings (so both sides use the same object store and model), stopped at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class EngineProc:
    address: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self) -> None:
        """Start a new engine process at the same address (after this one stopped)."""
        self.proc.wait(30)
        self.proc = spawn(self.address, self.env)


def spawn(address: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "loraplex.main", "engine", "--listen", address,
            "--parent-pid", str(os.getpid())]  # fmt: skip
    return subprocess.Popen(argv, env=env, cwd=ROOT)


@contextmanager
def engine_process(settings: GatewaySettings, **engine_env: Any) -> Iterator[EngineProc]:
    """``loraplex engine`` for ``settings`` (model, store, data dir...) plus ``engine_env``
    (e.g. ``max_num_seqs=8``), as LORAPLEX_* variables."""
    from loraplex.supervisor import child_env

    address = f"ipc://{tempfile.mkdtemp(prefix='lpx-', dir='/tmp')}/engine.sock"
    env = child_env(settings, **engine_env)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    engine = EngineProc(address, spawn(address, env), env)
    try:
        yield engine
    finally:
        engine.stop()
