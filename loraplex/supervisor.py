"""The processes of ``loraplex serve`` and ``loraplex gateway``.

``serve``: an engine server process (``loraplex engine``, restarted with a backoff if it
dies; when it exits with status 2, the model cannot be loaded, and ``serve`` stops too) and N gateway worker processes (uvicorn's, restarted by uvicorn), all from this
supervisor. Settings reach the children through ``LORAPLEX_*`` environment variables.
Without Redis and with several workers, this process also hosts the limits broker (a
thread), so the workers share one set of limit counters that outlives their restarts.
Ctrl-C or SIGTERM stops the workers (graceful), then the engine; a supervisor that is
killed outright leaves nothing behind: workers get SIGTERM from the kernel
(``PR_SET_PDEATHSIG``) and the engine stops when its parent is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loraplex.errors import EXIT_CONFIG, fail
from loraplex.gateway.settings import GatewaySettings

log = logging.getLogger("loraplex.serve")
_MAX_IPC_PATH = 100  # a Unix socket path must fit sun_path (108 bytes)


def default_workers() -> int:
    """Gateway processes for this machine: a quarter of the cores, 1 to 8 (the engine
    process needs a few cores of its own: its step loop, I/O thread and loaders)."""
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def engine_address(settings: GatewaySettings) -> str:
    """Where ``serve``'s engine listens: a Unix socket in the data dir (or /tmp if that
    path is too long), one per port so that two servers never share one."""
    return _ipc_address(settings, "engine")


def limits_broker_address(settings: GatewaySettings) -> str:
    """Where the limits broker listens (as ``engine_address``)."""
    return _ipc_address(settings, "limits")


def _ipc_address(settings: GatewaySettings, name: str) -> str:
    path = (settings.data_dir / f"{name}-{settings.port}.sock").resolve()
    if len(str(path)) > _MAX_IPC_PATH:
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        path = Path("/tmp") / f"loraplex-{name}-{digest}.sock"
    return f"ipc://{path}"


@contextmanager
def limits_broker(settings: GatewaySettings, workers: int) -> Iterator[str | None]:
    """Several workers without Redis: ONE in-process limiter for all of them, in this
    process (``gateway.limits_broker``); yields its address for the workers'
    ``LORAPLEX_LIMITS_BROKER_URL`` (None: the workers need none)."""
    if settings.redis_url or workers <= 1 or settings.limits_broker_url:
        yield settings.limits_broker_url
        return
    from loraplex.gateway.limits_broker import BrokerStartError, LimitsBroker

    broker = LimitsBroker(limits_broker_address(settings), lease_s=settings.limits_lease_s)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        broker.start()
    except (OSError, BrokerStartError) as exc:
        fail("LORAPLEX_DATA_DIR", f"cannot start the limits broker: {exc}")
    try:
        yield broker.address
    finally:
        broker.stop()


def child_env(settings: GatewaySettings, **extra: Any) -> dict[str, str]:
    """This process's environment plus every setting given (by environment or command
    line) as ``LORAPLEX_<NAME>``, plus ``extra``."""
    env = dict(os.environ)
    values = {name: getattr(settings, name) for name in settings.model_fields_set}
    values.update(extra)
    for name, value in values.items():
        key = f"LORAPLEX_{name.upper()}"
        if value is None:
            env.pop(key, None)
        elif isinstance(value, bool):
            env[key] = "true" if value else "false"
        elif isinstance(value, dict | list):
            env[key] = json.dumps(value)
        else:
            env[key] = str(value)
    return env


class EngineProcess:
    """``loraplex engine`` as a child process, restarted (with a doubling backoff, reset
    after a minute of good health) whenever it exits unasked."""

    def __init__(self, env: dict[str, str], address: str, *, backoff_max_s: float = 30.0):
        self._env = env
        self.address = address
        self._backoff_max_s = backoff_max_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engine-watch", daemon=True)
        self.restarts = 0
        self.fatal = False  # it exited with status 2: the model cannot be loaded

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "loraplex.main", "engine", "--listen", self.address,
                "--parent-pid", str(os.getpid())]  # fmt: skip
        # its own session: a terminal's Ctrl-C reaches the supervisor, which stops it last
        return subprocess.Popen(argv, env=self._env, start_new_session=True)

    def start(self) -> None:
        self._proc = self._spawn()
        self._thread.start()

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                return
            started = time.monotonic()
            rc = proc.wait()
            if self._stopping.is_set():
                return
            if rc == EXIT_CONFIG:  # it said why (cannot load the model): stop serving
                self.fatal = True
                self._stop_supervisor()
                return
            if time.monotonic() - started > 60:
                backoff = 1.0
            log.error("the engine process exited (status %s); restarting in %.0fs", rc, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, self._backoff_max_s)
            self.restarts += 1
            self._proc = self._spawn()

    def _stop_supervisor(self) -> None:
        """SIGTERM to this process (uvicorn stops the workers gracefully), again each
        second until it stops: a first one may land before uvicorn's handlers are set."""
        while not self._stopping.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            self._stopping.wait(1.0)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.error("the engine did not stop in %.0fs; killing it", timeout_s)
            proc.kill()
            proc.wait(5)


# How long uvicorn's supervisor waits for a worker to answer its health ping before it
# kills and replaces the worker. A spawned worker answers only once it has re-imported the
# command line's modules, and a busy one once its ping thread gets the CPU, each of which
# takes seconds on a loaded or cold machine: uvicorn's default (5 s) then kills workers in
# the middle of their requests, or every new worker before it answers, again and again, so
# that nothing serves. The price of a longer wait: a worker that dies while it is being
# pinged is noticed (and replaced) only this long after; its siblings serve meanwhile.
WORKER_HEALTHCHECK_S = 15


def run_gateways(settings: GatewaySettings, env: dict[str, str], workers: int) -> None:
    """uvicorn's workers over ``gateway.worker:create_worker_app`` until a signal stops
    them. Their settings come from ``env``."""
    import uvicorn

    from loraplex.gateway.http_protocol import http_protocol
    from loraplex.gateway.log_format import logging_config

    os.environ.update(env)  # uvicorn's spawned workers (and the one in-process) read it
    stopped: list[int] = []

    def remember(signum: int, _frame: Any) -> None:  # uvicorn re-raises what it caught
        stopped.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, remember)
    uvicorn.run(
        "loraplex.gateway.worker:create_worker_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        log_config=logging_config(settings.log_format),
        log_level="info",
        access_log=False,  # loraplex.request writes the line per request (gateway.request_log)
        timeout_graceful_shutdown=settings.drain_grace_s,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
        http=http_protocol(),  # malformed HTTP is answered in the API's error envelope
    )
