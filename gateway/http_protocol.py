"""uvicorn's HTTP/1.1 protocol, answering a request it cannot parse in the API's envelope,
and sending a response's head and body together.

uvicorn refuses a request whose framing is broken (a negative or non-numeric
Content-Length, bad chunking, an invalid header line) before any app sees it, with a
plain-text 400. These subclasses send OpenAI's error envelope instead, with an
``x-request-id`` like every other response; pass :func:`http_protocol` (an import path,
so that uvicorn's worker processes can import it) as uvicorn's ``http``.

uvicorn writes a response's status line and headers to the socket when the app sends
``http.response.start``, and the body with the next message: two sends, two TCP
segments, and a client woken for the head that must wait again for the body.
:class:`CoalescingTransport` holds what is written until the end of the event loop's
current turn and sends it in one write: a whole response (the app sends its head and body
in one turn), or a stream's head and first chunk when they come together; a head whose
body comes later leaves in the same turn anyway. A response's last bytes leave as soon as
the app has sent them (``on_response_complete``), before its middleware's teardown.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # uvicorn[standard]

_MESSAGE = "the request is not valid HTTP/1.1 (e.g. its Content-Length is not a size)"


def _body() -> tuple[bytes, bytes]:
    error = {"message": _MESSAGE, "type": "invalid_request_error", "param": None}
    body = json.dumps({"error": {**error, "code": "bad_request"}}).encode()
    return body, f"req_{uuid.uuid4().hex}".encode()


class CoalescingTransport:
    """A transport whose writes within one turn of the event loop leave as one write."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._held:
            asyncio.get_running_loop().call_soon(self.flush)
        self._held.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if self._held:
            data = b"".join(self._held) if len(self._held) > 1 else self._held[0]
            self._held = []
            if not self._transport.is_closing():
                self._transport.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def __getattr__(self, name: str) -> Any:  # is_closing, pause_reading, get_extra_info...
        return getattr(self._transport, name)


class EnvelopeH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body, request_id = _body()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


class EnvelopeHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport))  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        # The response's last bytes leave now, not at the end of the turn: the app's
        # middleware still runs after its last send (the request's log line, metrics),
        # and the client need not wait for that.
        transport = self.transport
        if isinstance(transport, CoalescingTransport):
            transport.flush()
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        body, request_id = _body()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"x-request-id: " + request_id + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(head))
        self.transport.close()


def http_protocol() -> str:
    """uvicorn's ``http`` setting: an import path (worker processes import it by name)."""
    return f"{__name__}:EnvelopeHttpToolsProtocol"
