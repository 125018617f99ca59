"""The app's edge (``GatewayEdge``): response counts, the drain's 503, request ids on every
response, the request log line, and a body-size cap enforced before parsing.

It is the outermost of the app's own middleware: it also turns an unhandled error into the
500 envelope itself, so that the 500 carries the request id too (Starlette's last-resort
handler sits outside every user middleware).
"""

from __future__ import annotations

import logging
import os
import re

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.gateway.drain import ALWAYS_SERVED, refuse_draining
from loraplex.gateway.errors import envelope
from loraplex.gateway.request_log import QUIET_PATHS, close_note, open_note

log = logging.getLogger("loraplex.gateway")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}\Z")
# Adapter uploads stream to disk under their own, larger cap (``admin.multipart``).
_OWN_LIMIT = re.compile(r"^/admin/v1/tenants/[^/]+/adapters/?\Z")
_MAX_LENGTH_DIGITS = 19  # a Content-Length past this is no size a server reads


class GatewayEdge:
    """The app's own outermost middleware, one layer for what five did (each layer cost
    every request a coroutine frame on the way in and a send wrapper for each message
    out), in their order from the outside:

    - counts every response by route template, method and status once it has been sent
      (or cut off);
    - takes a well-formed client ``x-request-id`` or makes one, and echoes it on the
      response; an unhandled error becomes the 500 envelope with that id;
    - while the worker drains, answers 503 ``draining`` to all but the probes;
    - writes the request's log line (``gateway.request_log``) once its response is sent;
    - reads the whole body before the app sees it (at most ``max_bytes``, which the app
      reads whole anyway), so that a body over the cap is a 413 however it is sent
      (Content-Length or chunked), and a Content-Length that is not a size is a 400.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, request_log: bool = True) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.request_log = request_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = False
        services = getattr(scope["app"].state, "services", None)
        try:
            given = ""
            for name, value in scope["headers"]:
                if name == b"x-request-id":
                    given = value.decode("latin-1")  # (the last one, as a dict of them reads)
            request_id = given if _SAFE_ID.match(given) else f"req_{os.urandom(16).hex()}"
            scope.setdefault("state", {})["request_id"] = request_id
            id_header = (b"x-request-id", request_id.encode())

            async def send_edge(message: Message) -> None:
                nonlocal status, started
                if message["type"] == "http.response.start":
                    started = True
                    status = message["status"]
                    headers = list(message.get("headers", []))
                    headers.append(id_header)
                    message = {**message, "headers": headers}
                await send(message)

            path = scope["path"]
            drain = getattr(services, "drain", None)
            if drain is not None and drain.draining and path not in ALWAYS_SERVED:
                await refuse_draining(send_edge)  # (no log line: the worker is going)
                return
            opened = open_note() if self.request_log and path not in QUIET_PATHS else None
            try:
                await self._read_body(scope, receive, send_edge)
            except Exception:
                if started:  # a streamed response cut off: nothing more can be sent
                    raise
                log.exception("unhandled error in %s %s (%s)", scope["method"], path, request_id)
                response = envelope(500, "internal server error", "server_error", "internal_error")
                await response(scope, receive, send_edge)
            finally:
                if opened is not None:
                    close_note(opened, scope, status)
        finally:
            metrics = getattr(services, "metrics", None)
            if metrics is not None:
                template = getattr(scope.get("route"), "path", None) or "other"
                metrics.observe_http(template, scope["method"], status)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        lengths = {v for k, v in scope["headers"] if k.lower() == b"content-length"}
        if lengths:
            length = lengths.pop()
            if lengths or not _is_size(length):
                await _bad_length(scope, receive, send)
                return
        if scope["method"] == "POST" and _OWN_LIMIT.match(scope["path"]):
            await self.app(scope, receive, send)  # its own cap (admin.multipart)
            return
        if lengths and int(length) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was sent
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = envelope(
            413,
            f"request body exceeds {self.max_bytes} bytes",
            "invalid_request_error",
            "payload_too_large",
        )
        await response(scope, receive, send)


def _is_size(value: bytes) -> bool:
    return value.isdigit() and value.isascii() and len(value) <= _MAX_LENGTH_DIGITS


async def _bad_length(scope: Scope, receive: Receive, send: Send) -> None:
    response = envelope(
        400,
        "the Content-Length header must be one non-negative whole number of bytes",
        "invalid_request_error",
        "bad_request",
        param="content-length",
    )
    await response(scope, receive, send)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """The body read ahead, as one message; then the client's channel (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def install_middleware(app: FastAPI, *, max_body_bytes: int, request_log: bool = True) -> None:
    app.add_middleware(GatewayEdge, max_bytes=max_body_bytes, request_log=request_log)
