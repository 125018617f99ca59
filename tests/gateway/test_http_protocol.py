"""The gateway's HTTP protocol (``gateway.http_protocol``) on a real uvicorn server: a
response leaves as soon as the app has sent its last bytes, before the app's own work
after that (the middleware's request log line and metrics) is done."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from loraplex.gateway.http_protocol import http_protocol


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(app: Any) -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", http=http_protocol()
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_response_leaves_before_the_apps_teardown() -> None:
    received = threading.Event()  # set by the client once it has the whole response
    seen: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b'{"ok":true}'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        # Teardown on the event loop's turn, as a middleware's log line is: blocking here,
        # the client can only have the response if it left with the last send. (Held to the
        # end of the turn, it would leave only after this wait gave up.)
        seen.append(received.wait(10))

    with serving(app) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        sock.settimeout(30)
        data = b""
        while not data.endswith(b'{"ok":true}'):
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        received.set()
        assert data.startswith(b"HTTP/1.1 200 ")
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen == [True]  # the client had the response while the app was still running
