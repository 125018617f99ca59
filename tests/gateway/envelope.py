"""Assertions on error responses: OpenAI's envelope, with a request id."""

from __future__ import annotations

from typing import Any

import httpx


def error(r: httpx.Response, status: int, *, param: str | None = None) -> dict[str, Any]:
    """The error of ``r``, after checking its status, envelope, content type and request id
    (and ``param``, when given)."""
    assert r.status_code == status, r.text
    assert r.headers.get("x-request-id"), r.headers
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    err: dict[str, Any] = body["error"]
    return err
