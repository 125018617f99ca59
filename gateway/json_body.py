"""JSON request bodies, read strictly, for every route with a JSON body.

Python's ``json`` reads more than JSON: ``NaN`` and ``Infinity``, duplicate keys (the last
one wins, so that two parsers of one body can disagree on what it says), and nesting
until the interpreter's recursion limit. A body that is not plain JSON (RFC 8259, UTF-8)
is a 400 naming why, and a body sent as another media type (or none) is a 415.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from email.message import Message
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException


class _NotJson(ValueError):
    pass


def _constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _NotJson(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def parse_json(body: bytes) -> Any:
    """Raises ``json.JSONDecodeError`` (FastAPI's 400 for a body that is not JSON)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        doc = body.decode("utf-8", "replace")
        raise json.JSONDecodeError("not UTF-8", doc, exc.start) from None
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except json.JSONDecodeError:
        raise
    except (_NotJson, ValueError) as exc:  # also an integer of over 4,300 digits
        raise json.JSONDecodeError(str(exc), text, 0) from None
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def is_json_media_type(content_type: str) -> bool:
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """A route whose JSON body is read by :func:`parse_json`; a body of another media type,
    or of none, is a 415 (FastAPI would not read it as JSON)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        has_json_body = self.body_field is not None

        async def strict(request: Request) -> Response:
            request = StrictJsonRequest(request.scope, request.receive)
            content_type = request.headers.get("content-type", "")
            if has_json_body and not is_json_media_type(content_type) and await request.body():
                sent = content_type[:100] or "no Content-Type"
                raise HTTPException(415, f"send the body as application/json, not {sent}")
            return await handler(request)

        return strict
