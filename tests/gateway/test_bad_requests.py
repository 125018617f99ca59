"""Bad requests get a 4xx in the OpenAI envelope, and the server is unharmed afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.gateway.live import BASE, Gateway

MSG = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with gateway.http("a") as client:
        yield client


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["x-request-id"]
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": BASE, "messages": MSG, "max_tokens": 2, **fields}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_chat(temperature="hot"), "temperature"),
        (_chat(temperature=2.5), "temperature"),
        (_chat(temperature=-0.1), "temperature"),
        (_chat(top_p=0), "top_p"),
        (_chat(max_tokens=-1), "max_tokens"),
        (_chat(max_tokens=0), "max_tokens"),
        (_chat(max_tokens="5"), "max_tokens"),
        (_chat(max_completion_tokens=1.5), "max_completion_tokens"),
        (_chat(n=0), "n"),
        (_chat(n=17), "n"),
        (_chat(presence_penalty=3), "presence_penalty"),
        (_chat(top_logprobs=21, logprobs=True), "top_logprobs"),
        (_chat(top_logprobs=2), "top_logprobs"),
        (_chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (_chat(stream="yes"), "stream"),
        (_chat(stream_options={"include_usage": True, "x": 1}), "stream_options.x"),
        (_chat(messages=[]), "messages"),
        (_chat(messages="hello"), "messages"),
        (_chat(messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role"),
        (_chat(messages=[{"role": "user"}]), "messages.0.content"),
        (_chat(tools=[{"type": "function"}]), "tools.0.function"),
        (_chat(response_format={"type": "yaml"}), "response_format"),
        ({"messages": MSG}, "model"),
        (_chat(model=""), "model"),
    ],
)
def test_chat_validation(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    err = _error(http.post("/v1/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    if param == "response_format":
        assert param in err["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": BASE, "prompt": ""}, "prompt"),
        ({"model": BASE, "prompt": []}, "prompt"),
        ({"model": BASE, "prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"model": BASE, "prompt": "hi", "echo": True, "logprobs": 1}, "echo"),
        ({"model": BASE, "prompt": "hi", "suffix": "x"}, "suffix"),
        ({"model": BASE, "prompt": "hi", "best_of": 2}, "best_of"),
        ({"model": BASE, "prompt": [10**9], "max_tokens": 1}, "prompt"),
    ],
)
def test_completions_validation(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    err = _error(http.post("/v1/completions", json=body), 400)
    assert err["param"] == param, err


def test_malformed_json(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert _error(r, 400)["type"] == "invalid_request_error"
    _error(
        http.post(
            "/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}
        ),
        400,
    )


def test_prompt_over_the_context(http: httpx.Client) -> None:
    long = "The quick brown fox jumps over the lazy dog. " * 200
    err = _error(
        http.post("/v1/chat/completions", json=_chat(messages=[{"role": "user", "content": long}])),
        400,
    )
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    err = _error(http.post("/v1/completions", json={"model": BASE, "prompt": long}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    err = _error(http.post("/v1/chat/completions", json=_chat(max_tokens=100_000)), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    err = _error(http.post("/v1/chat/completions", json=_chat(max_completion_tokens=100_000)), 400)
    assert err["param"] == "max_completion_tokens"


def test_huge_body_is_413(http: httpx.Client) -> None:
    huge = "x" * (300 * 1024)  # the test server caps bodies at 256 KiB
    err = _error(
        http.post("/v1/chat/completions", json=_chat(messages=[{"role": "user", "content": huge}])),
        413,
    )
    assert err["code"] == "payload_too_large"


def test_routing_errors_are_enveloped(http: httpx.Client) -> None:
    _error(http.get("/v1/chat/completions"), 405)
    _error(http.get("/v1/nothing-here"), 404)


def test_request_id_is_echoed(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=_chat(n=0), headers={"x-request-id": "client-id-42"})
    assert r.headers["x-request-id"] == "client-id-42"


def test_server_unharmed_after_bad_requests(gateway: Gateway, http: httpx.Client) -> None:
    for _ in range(3):
        http.post(
            "/v1/chat/completions",
            content=b"\xff\xfe garbage",
            headers={"content-type": "application/json"},
        )
    r = http.post("/v1/chat/completions", json=_chat(max_tokens=2))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    stats = gateway.engine.stats()
    assert stats is not None and stats.num_running == 0 and stats.num_waiting == 0
