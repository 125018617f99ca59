"""Regressions of issue #15 ("Hardening"): inputs that took the service down, grew it by
gigabytes, or answered outside the envelope. Each fails on the tree before the fix."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraplex.gateway.prompt_budget import CHARS_PER_TOKEN
from tests.gateway.envelope import error
from tests.gateway.live import BASE, Gateway

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CONTEXT = 512  # the tiny Llama's max_position_embeddings
MSG = [{"role": "user", "content": "Hello!"}]
SEED_RANGE = "must be an integer between -9223372036854775808 and 9223372036854775807"


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with gateway.http("a") as client:
        yield client


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": BASE, "messages": MSG, "max_tokens": 2, **fields}


def _text(**fields: Any) -> dict[str, Any]:
    return {"model": BASE, "prompt": "Hello", "max_tokens": 2, **fields}


def _serves(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=_chat())
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1, 2**63])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_seed_outside_64_bits_is_a_400(http: httpx.Client, route: str, seed: int) -> None:
    body = _chat(seed=seed) if "chat" in route else _text(seed=seed)
    err = error(http.post(route, json=body), 400, param="seed")
    assert err["message"] == f"seed: {SEED_RANGE}"
    _serves(http)  # the engine's step loop is alive


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 0])
def test_seed_at_the_bounds_is_served(http: httpx.Client, seed: int) -> None:
    r = http.post("/v1/completions", json=_text(seed=seed, temperature=1.0))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("stop", "param"),
    [("x" * 1001, "stop"), (["a", "x" * 1001], "stop.1"), (["a", "b", "c", "d", "e"], "stop")],
)
def test_stop_sequences_are_bounded(http: httpx.Client, stop: Any, param: str) -> None:
    err = error(http.post("/v1/chat/completions", json=_chat(stop=stop)), 400, param=param)
    assert "1000 characters" in err["message"] or "at most 4" in err["message"], err


def test_longest_stop_sequence_is_served(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=_chat(stop=["x" * 1000, "y"]))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("chat", _chat(messages=[{"role": "user", "content": "a\ud800b"}]), "messages.0.content"),
        (
            "chat",
            _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]),
            "messages.0.content.0.text",
        ),
        ("chat", _chat(messages=[{"role": "user", "content": "hi", "name": "\ud800"}]), None),
        ("chat", _chat(stop="\ud800"), "stop"),
        ("chat", _chat(user="\ud800"), "user"),
        ("chat", _chat(model="base\ud800"), "model"),
        ("text", _text(prompt="\ud800"), "prompt"),
    ],
)
def test_lone_surrogate_is_a_400_naming_the_field(
    http: httpx.Client, route: str, body: dict[str, Any], param: str | None
) -> None:
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    raw = json.dumps(body).encode()  # "\ud800" escaped: valid JSON, not valid Unicode
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    err = error(r, 400, param=param or "messages.0.name")
    assert "surrogate" in err["message"] or "unicode" in err["message"], err
    _serves(http)


def test_prompt_too_large_for_the_context_is_refused_before_tokenizing(http: httpx.Client) -> None:
    chars = CONTEXT * CHARS_PER_TOKEN + 1
    err = error(http.post("/v1/completions", json=_text(prompt="a" * chars)), 400, param="prompt")
    assert err["code"] == "context_length_exceeded"
    assert f"{chars} characters" in err["message"], err  # counted, not tokenized
    half = "b" * (chars // 2 + 1)
    messages = [{"role": "user", "content": half}, {"role": "user", "content": half}]
    err = error(http.post("/v1/chat/completions", json=_chat(messages=messages)), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert "characters" in err["message"], err


def test_token_ids_and_messages_are_bounded_by_the_context(http: httpx.Client) -> None:
    err = error(http.post("/v1/completions", json=_text(prompt=[5] * CONTEXT)), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    messages = [{"role": "user", "content": ""}] * CONTEXT
    err = error(http.post("/v1/chat/completions", json=_chat(messages=messages)), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"


def test_chunked_body_over_the_limit_is_413(http: httpx.Client) -> None:
    body = json.dumps(_text(prompt="a" * (300 * 1024))).encode()  # the server caps 256 KiB

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 16 * 1024):
            yield body[i : i + 16 * 1024]

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers  # sent chunked
    assert error(r, 413)["code"] == "payload_too_large"
    _serves(http)


def test_multipart_is_capped_outside_adapter_uploads(http: httpx.Client) -> None:
    files = {"file": ("big.bin", b"x" * (300 * 1024), "application/octet-stream")}
    assert error(http.post("/v1/chat/completions", files=files), 413)["code"] == "payload_too_large"


def test_adapter_upload_past_the_body_limit_is_taken(
    gateway: Gateway, tiny_llama_dir: Path, make_peft_adapter: Callable[..., Path]
) -> None:
    """Uploads have their own cap: a Content-Length past the API's body limit (256 KiB here)
    is still taken (it was a 413 for every adapter over 4 MiB once the limit also read
    Content-Length)."""
    adapter = make_peft_adapter(tiny_llama_dir, rank=64, targets=ALL_TARGETS, seed=9)
    size = sum((adapter / f).stat().st_size for f in ("adapter_config.json",
                                                      "adapter_model.safetensors"))  # fmt: skip
    assert size > 256 * 1024
    files = [
        ("files", (f, (adapter / f).read_bytes(), "application/octet-stream"))
        for f in ("adapter_config.json", "adapter_model.safetensors")
    ]
    with gateway.admin() as admin:
        r = admin.post(f"/admin/v1/tenants/{gateway.tenants['a']}/adapters",
                       data={"name": "big-upload"}, files=files)  # fmt: skip
    assert r.status_code == 201, r.text


def _raw(gateway: Gateway, request: bytes) -> tuple[str, dict[str, str], bytes]:
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


@pytest.mark.parametrize("length", [b"-1", b"abc", b"1e3", b"99999999999999999999999"])
def test_bad_content_length_is_a_400_in_the_envelope(gateway: Gateway, length: bytes) -> None:
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + length + b"\r\nConnection: close\r\n\r\n{}"
    )
    status, headers, body = _raw(gateway, request)
    assert status.startswith("HTTP/1.1 400"), (status, body)
    assert headers["content-type"].startswith("application/json") and headers["x-request-id"]
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_unhandled_error_is_a_500_with_a_request_id(gateway: Gateway) -> None:
    async def boom() -> None:
        raise RuntimeError("a bug")

    gateway.app.add_api_route("/_test/boom", boom, include_in_schema=False)
    with gateway.http() as http:
        err = error(http.get("/_test/boom", headers={"x-request-id": "trace-500"}), 500)
        r = http.get("/_test/boom", headers={"x-request-id": "trace-500"})
    assert err == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert r.headers["x-request-id"] == "trace-500"


def test_text_prompt_keeps_control_tokens(http: httpx.Client) -> None:
    """Completions take raw text, as OpenAI's do: a control token written in the prompt is
    the model's (chat messages are the boundary that must not be crossed)."""
    r = http.post("/v1/completions", json=_text(prompt="<|im_start|>"))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 1
