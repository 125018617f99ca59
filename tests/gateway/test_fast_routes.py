"""The inference routes' usual request runs in ``gateway.fast_routes`` (not through
FastAPI's routing and dependency solving), and answers exactly as the FastAPI route does:
each case is sent with the fast path on and off (an app with dependency overrides hands
every request to FastAPI), and the two answers are compared."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from loraplex.gateway.fast_routes import FastInference
from tests.gateway.live import BASE, Gateway

MSG = [{"role": "user", "content": "Hello!"}]
CMPL = {"model": BASE, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
CHAT = {"model": BASE, "messages": MSG, "max_tokens": 3, "temperature": 0}
JSON = "application/json"


def _fast(gw: Gateway) -> FastInference:
    app: Any = gw.app.middleware_stack
    while not isinstance(app, FastInference):
        app = app.app
    return app


def _send(gw: Gateway, path: str, key: str | None, body: bytes, ctype: str | None) -> Any:
    headers = {"Authorization": key} if key is not None else {}
    if ctype is not None:
        headers["Content-Type"] = ctype
    with httpx.Client(base_url=gw.url, timeout=60) as http:
        r = http.post(path, content=body, headers=headers)
    assert r.headers["x-request-id"]
    kept = {k: v for k, v in r.headers.items() if k.startswith("x-ratelimit-limit")}
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [x for x in r.text.split("\n\n") if x]
        return r.status_code, kept, len(events), events[-1]
    doc = r.json()
    for field in ("id", "created"):  # made per request
        doc.pop(field, None)
    if "usage" in doc:  # the second of two equal prompts finds the first's KV blocks
        doc["usage"].pop("prompt_tokens_details", None)
    return r.status_code, kept, r.headers["content-type"], doc


CASES: list[tuple[str, str, str | None, bytes, str | None]] = [
    # (name, path, key role or a raw Authorization value, body, content type)
    ("completion", "/v1/completions", "a", json.dumps(CMPL).encode(), JSON),
    ("chat", "/v1/chat/completions", "a", json.dumps(CHAT).encode(), JSON),
    ("stream", "/v1/completions", "a", json.dumps({**CMPL, "stream": True}).encode(), JSON),
    ("json+charset", "/v1/completions", "a", json.dumps(CMPL).encode(), JSON + "; charset=utf-8"),
    ("bearer case", "/v1/completions", "bearer:a", json.dumps(CMPL).encode(), JSON),
    ("no key", "/v1/completions", None, json.dumps(CMPL).encode(), JSON),
    ("basic scheme", "/v1/completions", "Basic abc", json.dumps(CMPL).encode(), JSON),
    ("wrong key", "/v1/completions", "Bearer lpx_nope_nope", json.dumps(CMPL).encode(), JSON),
    ("revoked", "/v1/chat/completions", "a_revoked", json.dumps(CHAT).encode(), JSON),
    ("expired", "/v1/completions", "a_expired", json.dumps(CMPL).encode(), JSON),
    ("suspended", "/v1/completions", "s", json.dumps(CMPL).encode(), JSON),
    ("no scope", "/v1/chat/completions", "a_read_only", json.dumps(CHAT).encode(), JSON),
    ("unknown model", "/v1/completions", "a", json.dumps({**CMPL, "model": "x"}).encode(), JSON),
    ("bad value", "/v1/completions", "a", json.dumps({**CMPL, "n": 0}).encode(), JSON),
    ("unknown field", "/v1/chat/completions", "a", json.dumps({**CHAT, "x": 1}).encode(), JSON),
    ("bad value, no key", "/v1/completions", None, json.dumps({**CMPL, "n": 0}).encode(), JSON),
    ("not json", "/v1/completions", "a", b'{"model": ', JSON),
    ("not json, no key", "/v1/completions", None, b"{nope", JSON),
    ("NaN", "/v1/completions", "a", b'{"model": "m", "prompt": "x", "temperature": NaN}', JSON),
    ("duplicate key", "/v1/completions", "a", b'{"model": "a", "model": "b", "prompt": "x"}', JSON),
    ("a list", "/v1/completions", "a", b"[1, 2]", JSON),
    ("empty body", "/v1/completions", "a", b"", JSON),
    ("text/plain", "/v1/completions", "a", json.dumps(CMPL).encode(), "text/plain"),
    ("no content type", "/v1/chat/completions", "a", json.dumps(CHAT).encode(), None),
    ("stream_options", "/v1/completions", "a",
     json.dumps({**CMPL, "stream_options": {"include_usage": True}}).encode(), JSON),
]  # fmt: skip
SERVED = {"completion", "chat", "stream", "json+charset", "bearer case"}
RUN_HERE = SERVED | {"unknown model", "stream_options"}  # the endpoint raised: its 404, 400


def _auth(gw: Gateway, who: str | None) -> str | None:
    if who is None or " " in who:
        return who
    if who.startswith("bearer:"):
        return "bearer " + gw.keys[who.removeprefix("bearer:")]
    return "Bearer " + gw.keys[who]


@pytest.mark.parametrize(("name", "path", "who", "body", "ctype"), CASES, ids=[c[0] for c in CASES])
def test_answers_as_fastapi_does(
    gateway: Gateway, name: str, path: str, who: str | None, body: bytes, ctype: str | None
) -> None:
    fast = _fast(gateway)
    key = _auth(gateway, who)
    before = fast.ran
    on = _send(gateway, path, key, body, ctype)
    assert fast.ran - before == (1 if name in RUN_HERE else 0)
    gateway.app.dependency_overrides[_auth] = _auth  # no route has it: FastAPI answers all
    try:
        off = _send(gateway, path, key, body, ctype)
    finally:
        gateway.app.dependency_overrides.pop(_auth, None)
    assert fast.ran - before == (1 if name in RUN_HERE else 0)
    assert on == off
    assert (on[0] == 200) == (name in SERVED)
