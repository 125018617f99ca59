"""What ``serve`` and ``gateway`` tell the operator at start: the port is checked before
anything is created, and the first start's tenant and secrets are made (and printed) only
once the server answers ``/ready``, followed by one "ready on http://..." line and next
steps. A start that never gets there (a port taken, a model that does not load) creates
nothing, so the next start still prints the secrets.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable

import httpx

from loraplex.errors import fail

log = logging.getLogger("loraplex.serve")


def check_port(host: str, port: int) -> None:
    """Exit 2 naming LORAPLEX_PORT when ``host:port`` cannot be bound (a server is on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            why = "in use (another server?)" if exc.errno == errno.EADDRINUSE else exc.strerror
            fail("LORAPLEX_PORT", f"cannot listen on {host}:{port}: {why}; choose --port")


def local_url(host: str, port: int) -> str:
    """The URL to reach a server bound on ``host`` from this machine."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def command() -> str:
    """How the user types ``loraplex`` here: ``loraplex`` when it is on the PATH, else the
    path to it (``.venv/bin/loraplex`` under ``make serve``)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0].endswith("loraplex") else ""
    if not argv0 or shutil.which("loraplex") == os.path.abspath(argv0):
        return "loraplex"
    return os.path.relpath(argv0)


def next_steps(url: str, model: str) -> str:
    return "\n".join(
        [
            f"loraplex ready on {url} (model {model!r}). Next:",
            "  export LORAPLEX_API_KEY=<API key> LORAPLEX_ADMIN_TOKEN=<admin token>"
            "   (both printed once, at the first start)",
            f'  curl -s {url}/v1/chat/completions -H "Authorization: Bearer $LORAPLEX_API_KEY" '
            "-H 'Content-Type: application/json' \\",
            f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", '
            '"content": "What is the capital of France?"}], "temperature": 0}\'',
            f"  {command()} admin --help   (tenants, keys, plans, adapters; README.md has more)",
        ]
    )


class Announcer:
    """A thread: waits for ``/ready``, then runs ``bootstrap`` (-> the secrets' banner or
    "") and prints it and the ready line. ``stop()`` ends it early."""

    def __init__(self, url: str, model: str, bootstrap: Callable[[], str]) -> None:
        self.url, self.model, self._bootstrap = url, model, bootstrap
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="announce", daemon=True)
        self.announced = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        waited_since = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while not self._stop.wait(0.3):
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - waited_since > 60:
                    waited_since = time.monotonic()
                    log.info("still waiting for %s/ready (the engine, the database)", self.url)
            else:
                return
        try:
            banner = self._bootstrap()
        except BaseException as exc:  # a failed bootstrap (typer.Exit included) stops nothing
            log.error("first-start bootstrap failed: %s", exc)
            return
        if banner:
            print(banner, flush=True)
        print(next_steps(self.url, self.model), flush=True)
        self.announced.set()
