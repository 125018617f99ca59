"""Real services for gateway and admin tests: a fresh migrated PostgreSQL database and
a real uvicorn server (in a thread, on a free port) serving an app from the factory."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import psycopg
import uvicorn
from fastapi import FastAPI
from harness import services
from harness.engines import EngineProc

from loraplex.engine.client import EngineClient
from loraplex.gateway.http_protocol import http_protocol
from loraplex.gateway.state import Services


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
def live_server(
    app: FastAPI, *, startup_timeout_s: float = 120.0, port: int | None = None
) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread (lifespan on), on ``port`` (default: a free
    one). Yields the base URL."""
    port = port or free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        http=http_protocol(),  # as `loraplex serve` runs it
    )
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


BASE = "tiny-llama"


@dataclass
class Gateway:
    url: str
    app: FastAPI
    database_url: str
    admin_token: str
    engine_proc: EngineProc | None = None  # the engine server process (remote engine only)
    tenants: dict[str, str] = field(default_factory=dict)  # role -> tenant name
    keys: dict[str, str] = field(default_factory=dict)  # role -> full API key

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    @property
    def engine(self) -> EngineClient:
        engine = self.services.engine
        assert engine is not None
        return engine

    def stop_engine(self) -> None:
        """Shut the engine down under the gateway (in flight: streams end with abort)."""
        if self.engine_proc is not None:
            self.engine_proc.stop()
        else:
            self.engine.shutdown()  # type: ignore[attr-defined]

    def admin(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)

    def sdk(self, key: str = "a") -> openai.OpenAI:
        return openai.OpenAI(api_key=self.keys[key], base_url=f"{self.url}/v1", max_retries=0)

    def async_sdk(self, key: str = "a") -> openai.AsyncOpenAI:
        # a fresh connection per request: on a loaded CI box a pooled connection could be
        # closed by the server's keep-alive timeout as the next request went out on it
        # (an APIConnectionError once in ~2,000 tests, never a gateway fault)
        http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_keepalive_connections=0))
        return openai.AsyncOpenAI(
            api_key=self.keys[key], base_url=f"{self.url}/v1", max_retries=0, http_client=http
        )

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        url = self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


def ok(r: httpx.Response) -> Any:
    assert r.is_success, r.text
    return r.json()


def wait_until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)
