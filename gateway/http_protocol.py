"""uvicorn's HTTP/1.1 protocol, answering a request it cannot parse in the API's envelope.

uvicorn refuses a request whose framing is broken (a negative or non-numeric
Content-Length, bad chunking, an invalid header line) before any app sees it, with a
plain-text 400. These subclasses send OpenAI's error envelope instead, with an
``x-request-id`` like every other response; pass :func:`http_protocol` (an import path,
so that uvicorn's worker processes can import it) as uvicorn's ``http``.
"""

from __future__ import annotations

import json
import uuid

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # uvicorn[standard]

_MESSAGE = "the request is not valid HTTP/1.1 (e.g. its Content-Length is not a size)"


def _body() -> tuple[bytes, bytes]:
    error = {"message": _MESSAGE, "type": "invalid_request_error", "param": None}
    body = json.dumps({"error": {**error, "code": "bad_request"}}).encode()
    return body, f"req_{uuid.uuid4().hex}".encode()


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
