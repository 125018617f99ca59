"""The one place where errors become HTTP responses, in the OpenAI error envelope."""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.engine import errors as engine_errors
from loraplex.tenancy.errors import DomainError, RateLimited, Unavailable

log = logging.getLogger("loraplex.gateway")

_ENGINE_STATUS: list[tuple[type[engine_errors.EngineError], int, str, str]] = [
    (engine_errors.PromptTooLong, 400, "invalid_request_error", "context_length_exceeded"),
    (engine_errors.AdapterIncompatible, 400, "invalid_request_error", "adapter_incompatible"),
    (engine_errors.InvalidRequest, 400, "invalid_request_error", "invalid_value"),
    (engine_errors.AdapterLoadError, 503, "service_unavailable", "adapter_unavailable"),
    (engine_errors.EngineOverloaded, 503, "service_unavailable", "engine_overloaded"),
    (engine_errors.EngineDead, 503, "service_unavailable", "engine_unavailable"),
    (engine_errors.EngineError, 500, "server_error", "engine_error"),
]

_HTTP_CODES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


class _AsciiJSON(JSONResponse):
    """Non-ASCII escaped: an error message may quote what a request sent, and text that
    is not valid Unicode must still make a response."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def envelope(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return _AsciiJSON(body, status_code=status, headers=headers)


# An engine 503 (an adapter that could not be fetched, an overloaded engine) says nothing
# of when to come back; the adapter fetcher's breaker probes again within seconds.
ENGINE_RETRY_AFTER_S = 1


def retry_after(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def engine_error_kind(exc: engine_errors.EngineError) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, code) of an engine error."""
    for cls, status, type_, code in _ENGINE_STATUS:
        if isinstance(exc, cls):
            return status, type_, code
    return 500, "server_error", "engine_error"


def engine_error_response(exc: engine_errors.EngineError) -> JSONResponse:
    status, type_, code = engine_error_kind(exc)
    if status != 500:
        headers = retry_after(ENGINE_RETRY_AFTER_S) if status == 503 else None
        return envelope(status, exc.message, type_, code, exc.param, headers)
    return envelope(500, exc.message, "server_error", "engine_error", exc.param)


_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _pick(errs: list[Any]) -> Any:
    """The error to report: a union tries each member, and the member that did not even
    match the input's type (``string_type``, ``list_type``...) says the least."""
    return next((e for e in errs if not str(e.get("type", "")).endswith("_type")), errs[0])


_TYPE_WORDS = {
    "string_type": "a string",
    "list_type": "a list",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "literal_error": "one of the allowed values",
}


def _member(err: Any) -> str:
    """What one branch of a union wanted, in words: ``a list of content parts``."""
    tag = str(err.get("loc", ("",))[-1])
    if tag.startswith("list["):
        if "TextPart" in tag:
            return "a list of content parts"
        if tag.startswith("list[list["):
            return "a list of token id lists"
        if "int" in tag:
            return "a list of token ids"
        return "a list of strings" if "str" in tag else "a list"
    if err.get("type") == "literal_error":
        return f"one of {(err.get('ctx') or {}).get('expected', 'the allowed values')}"
    return _TYPE_WORDS.get(str(err.get("type")), "a valid value")


def _path(loc: list[str]) -> str:
    """``messages[1].content``: the field as a person reads it."""
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = list(exc.errors())
    if not errs:
        return "invalid request", None
    first = _pick(errs)
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error")
        return "request body is not valid JSON" + (f": {reason}" if reason else ""), None
    # Union members add tags such as "constrained-str" or "list[int]" to the location;
    # the param names only fields and list indices.
    loc = _fields(first)
    param = ".".join(loc) or None
    path = _path(loc)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        return (f"unsupported parameter: {param}" if param else "unsupported parameter"), param
    same = [e for e in errs if _fields(e) == loc]
    if len(same) > 1 and all(e.get("type") in _TYPE_WORDS for e in same):
        # every branch of a union refused the value's type: say what the field takes
        wanted = list(dict.fromkeys(_member(e) for e in same))
        msg = "expected " + (
            " or ".join([", ".join(wanted[:-1]), wanted[-1]]) if len(wanted) > 1 else wanted[0]
        )
    return (f"{path}: {msg}" if path else msg), param


def _fields(err: Any) -> list[str]:
    return [
        str(p)
        for p in err.get("loc", ())
        if p not in ("body", "query", "path", "header")
        and (isinstance(p, int) or _FIELD.match(str(p)))
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        headers = None
        if isinstance(exc, RateLimited):
            headers = {**retry_after(exc.retry_after), **exc.headers}
        elif isinstance(exc, Unavailable):
            headers = retry_after(exc.retry_after)
        return envelope(exc.status, exc.message, exc.type, exc.code, exc.param, headers)

    @app.exception_handler(engine_errors.EngineError)
    async def _engine(_: Request, exc: engine_errors.EngineError) -> JSONResponse:
        return engine_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return envelope(400, message, "invalid_request_error", "invalid_value", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_, code = _HTTP_CODES.get(exc.status_code, ("server_error", "http_error"))
        headers = dict(exc.headers) if exc.headers else None
        return envelope(exc.status_code, str(exc.detail), type_, code, None, headers)

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return envelope(500, "internal server error", "server_error", "internal_error")
