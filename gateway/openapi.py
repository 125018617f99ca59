"""The OpenAPI document, true to what the API answers.

Every error is OpenAI's envelope (:class:`ErrorResponse`). Routes list the statuses
their own dependencies and services can answer (``responses=errors(...)``);
:func:`install_openapi` adds those any request can get from the middleware and the
error handlers (400: a malformed request or Content-Length; 413: a body over the limit;
500: an internal error) and drops FastAPI's 422, which this API never answers (a
request that fails validation is a 400).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

_DESCRIPTIONS = {
    400: "Bad request: a parameter, the JSON body or a header is invalid",
    401: "Missing, wrong, expired or revoked credentials",
    403: "The credentials lack the scope, or the tenant is suspended",
    404: "Not found",
    409: "Conflict: the name is taken",
    413: "The request body is over the limit",
    415: "The body is not sent as application/json",
    429: "Rate limit or budget exceeded (see Retry-After)",
    500: "Internal error",
    503: "A dependency (database, object store, engine) is unavailable",
}
_ALWAYS = (400, 413, 500)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope."""

    error: ErrorDetail


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route that can answer these error statuses."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


def text_stream(description: str) -> dict[str, Any]:
    """The 200 of a route that streams server-sent events when asked to (``stream``): the
    schema is one event's."""
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "description": "a chunk (the JSON of the application/json schema, "
                "with choices' deltas), an error envelope, or `[DONE]` last",
            },
            "event": {"type": "string"},
        },
    }
    return {"description": description, "content": {"text/event-stream": {"schema": event}}}


def download(
    description: str, media_types: Mapping[Any, str], *, binary: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The 200 of a route that sends a file (``Content-Disposition: attachment``) in one
    of ``media_types`` (format -> media type); ``binary`` formats are bytes, others text."""
    content = {
        media: {"schema": {"type": "string", **({"format": "binary"} if fmt in binary else {})}}
        for fmt, media in media_types.items()
    }
    return {"description": description, "content": content}


_REF = "#/components/schemas/{model}"


def _document_errors(schema: dict[str, Any]) -> None:
    ref = {"$ref": _REF.format(model="ErrorResponse")}
    content = {"application/json": {"schema": ref}}
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for code in _ALWAYS:
                responses.setdefault(
                    str(code), {"description": _DESCRIPTIONS[code], "content": content}
                )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    if "ErrorResponse" not in components:
        envelope = ErrorResponse.model_json_schema(ref_template=_REF)
        components.update(envelope.pop("$defs", {}))
        components["ErrorResponse"] = envelope


def install_openapi(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _document_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
