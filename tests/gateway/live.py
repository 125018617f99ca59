"""Real services for gateway and admin tests: a fresh migrated PostgreSQL database and
a real uvicorn server (in a thread, on a free port) serving an app from the factory."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI
from harness import services


@contextmanager
def fresh_database() -> Iterator[str]:
    """A database of its own (module-scoped servers must not see other tests' truncations),
    migrated to head; dropped afterwards. Yields its asyncpg URL."""
    services.ensure_postgres()
    url = services.create_database()
    try:
        services.migrate(url)
        yield url
    finally:
        services.drop_database(url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(app: FastAPI, *, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread (lifespan on). Yields the base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup (see the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start in time")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
