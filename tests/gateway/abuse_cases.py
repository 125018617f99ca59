"""The bad-input table for the inference routes: each kind of bad request, the status it
must get, and the ``param`` the envelope must name (None: not checked)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tests.gateway.live import BASE

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
JSON = "application/json"
MSG = [{"role": "user", "content": "Hello!"}]


@dataclass(frozen=True)
class Case:
    kind: str
    route: str
    body: bytes
    status: int
    param: str | None = None
    content_type: str | None = JSON


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": BASE, "messages": MSG, "max_tokens": 2, **fields}


def text(**fields: Any) -> dict[str, Any]:
    return {"model": BASE, "prompt": "Hello", "max_tokens": 2, **fields}


def _c(
    kind: str, body: Any, status: int = 400, param: str | None = None, route: str = CHAT
) -> Case:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Case(kind, route, raw, status, param)


def _t(kind: str, body: Any, status: int = 400, param: str | None = None) -> Case:
    return _c(kind, body, status, param, TEXT)


def _raw(kind: str, raw: bytes, status: int = 400, route: str = CHAT) -> Case:
    return Case(kind, route, raw, status)


_CHAT = json.dumps(chat())
_DEEP = 100_000

CASES: list[Case] = [
    # types
    _c("temperature as string", chat(temperature="hot"), param="temperature"),
    _c("temperature as bool", chat(temperature=True), param="temperature"),
    _c("max_tokens as string", chat(max_tokens="5"), param="max_tokens"),
    _c("max_tokens as float", chat(max_tokens=1.5), param="max_tokens"),
    _c("max_tokens as bool", chat(max_tokens=True), param="max_tokens"),
    _c("n as float", chat(n=2.0), param="n"),
    _c("seed as string", chat(seed="42"), param="seed"),
    _c("seed as float", chat(seed=1.5), param="seed"),
    _c("stream as string", chat(stream="yes"), param="stream"),
    _c("stream_options as list", chat(stream_options=[True]), param="stream_options"),
    _c("messages as string", chat(messages="hello"), param="messages"),
    _c("message as string", chat(messages=["hello"]), param="messages.0"),
    _c("content as number", chat(messages=[{"role": "user", "content": 5}])),
    _c("model as number", chat(model=5), param="model"),
    _t("prompt as number", text(prompt=5), param="prompt"),
    _t("prompts mixing text and ids", text(prompt=["a", [1, 2]]), param="prompt"),
    _t("prompt lists with an empty one", text(prompt=[[1, 2], []]), param="prompt.1"),
    _t("more than 128 prompts", text(prompt=["a"] * 129), param="prompt"),
    _t("prompt id as float", text(prompt=[1.5])),
    # ranges
    _c("temperature over 2", chat(temperature=2.5), param="temperature"),
    _c("temperature negative", chat(temperature=-0.1), param="temperature"),
    _c("top_p zero", chat(top_p=0), param="top_p"),
    _c("top_p over 1", chat(top_p=1.5), param="top_p"),
    _c("max_tokens zero", chat(max_tokens=0), param="max_tokens"),
    _c("max_tokens negative", chat(max_tokens=-1), param="max_tokens"),
    _c("max_tokens over the context", chat(max_tokens=10**6), param="max_tokens"),
    _c("n zero", chat(n=0), param="n"),
    _c("n over 16", chat(n=17), param="n"),
    _c("presence_penalty under -2", chat(presence_penalty=-3), param="presence_penalty"),
    _c("frequency_penalty over 2", chat(frequency_penalty=3), param="frequency_penalty"),
    _c("top_logprobs over 20", chat(logprobs=True, top_logprobs=21), param="top_logprobs"),
    _c("top_logprobs without logprobs", chat(top_logprobs=2), param="top_logprobs"),
    _t("logprobs over 5", text(logprobs=6), param="logprobs"),
    _t("negative token id", text(prompt=[-1]), param="prompt.0"),
    _t("token id past the vocabulary", text(prompt=[10**9]), param="prompt"),
    # huge numbers
    _c("seed 2**64", chat(seed=2**64), param="seed"),
    _c("seed -2**63-1", chat(seed=-(2**63) - 1), param="seed"),
    _c("max_tokens 2**70", chat(max_tokens=2**70), param="max_tokens"),
    _t("token id 2**64", text(prompt=[2**64]), param="prompt"),
    _raw(
        "integer of 5000 digits",
        _CHAT.replace('"max_tokens": 2', '"max_tokens": ' + "9" * 5000).encode(),
    ),
    _raw("temperature 1e999 (infinite)", _CHAT.replace("}", ', "temperature": 1e999}', 1).encode()),
    # NaN / Infinity literals
    _raw("NaN literal", _CHAT.replace("}", ', "temperature": NaN}', 1).encode()),
    _raw("Infinity literal", _CHAT.replace("}", ', "top_p": Infinity}', 1).encode()),
    _raw("-Infinity literal", _CHAT.replace("}", ', "presence_penalty": -Infinity}', 1).encode()),
    # nulls
    _c("messages null", chat(messages=None), param="messages"),
    _c("model null", chat(model=None), param="model"),
    _c("content null", chat(messages=[{"role": "user", "content": None}])),
    _c("n null", chat(n=None), param="n"),
    _t("prompt null", text(prompt=None), param="prompt"),
    _raw("body null", b"null"),
    # missing, empty, unknown
    _c("model missing", {"messages": MSG}, param="model"),
    _c("messages missing", {"model": BASE}, param="messages"),
    _c("model empty", chat(model=""), param="model"),
    _c("messages empty", chat(messages=[]), param="messages"),
    _c("content parts empty", chat(messages=[{"role": "user", "content": []}])),
    _c(
        "role unknown",
        chat(messages=[{"role": "wizard", "content": "hi"}]),
        param="messages.0.role",
    ),
    _c(
        "tool message without its call id",
        chat(messages=[{"role": "tool", "content": "hi"}]),
        param="messages.0.tool_call_id",
    ),
    _c("content part image", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
    _c("message extra field", chat(messages=[{"role": "user", "content": "hi", "x": 1}])),
    _c("tool without function", chat(tools=[{"type": "function"}]), param="tools.0.function"),
    _c(
        "unknown response_format",
        chat(response_format={"type": "yaml"}),
        param="response_format",
    ),
    _t("unsupported echo with logprobs", text(echo=True, logprobs=1), param="echo"),
    _t("unsupported best_of", text(best_of=2), param="best_of"),
    _t("prompt empty", text(prompt=""), param="prompt"),
    _t("prompt ids empty", text(prompt=[]), param="prompt"),
    _c("model unknown", chat(model="no-such-model"), status=404, param="model"),
    # sizes
    _c("stop over 4", chat(stop=["a", "b", "c", "d", "e"]), param="stop"),
    _c("stop of 1001 characters", chat(stop="x" * 1001), param="stop"),
    _c("stop empty", chat(stop=""), param="stop"),
    _c("model of 257 characters", chat(model="m" * 257), param="model"),
    _c("user of 257 characters", chat(user="u" * 257), param="user"),
    _c(
        "messages over 4096",
        chat(messages=[{"role": "user", "content": ""}] * 4097),
        param="messages",
    ),
    _c(
        "content parts over 256",
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 257}]),
    ),
    _c(
        "messages over the context",
        chat(messages=[{"role": "user", "content": ""}] * 600),
        param="messages",
    ),
    _t("token ids over the context", text(prompt=[5] * 600), param="prompt"),
    _raw("body over the limit", json.dumps(text(prompt="a" * (5 << 20))).encode(), 413, TEXT),
    # encodings and unicode
    _raw("invalid UTF-8", b'{"model": "\xff\xfe", "messages": []}'),
    _raw("UTF-16 body", _CHAT.encode("utf-16")),
    _raw("UTF-8 byte order mark", b"\xef\xbb\xbf" + _CHAT.encode()),
    _raw("lone surrogate in content", _CHAT.replace("Hello!", "\\ud800").encode()),
    _raw("lone low surrogate in stop", _CHAT.replace("}", ', "stop": "\\udc00"}', 1).encode()),
    # JSON syntax and shape
    _raw("truncated JSON", b'{"model": "x", "messages": ['),
    _raw("trailing garbage", _CHAT.encode() + b" garbage"),
    _raw("single quotes", _CHAT.replace('"', "'").encode()),
    _raw("comment", b"/* hi */ " + _CHAT.encode()),
    _raw("empty body", b""),
    _raw("top-level array", b"[1, 2]"),
    _raw("top-level string", b'"hello"'),
    _raw("top-level number", b"42"),
    # duplicates and nesting
    _raw(
        "duplicate key",
        _CHAT.replace('"max_tokens": 2', '"max_tokens": 2, "max_tokens": 3').encode(),
    ),
    _raw("duplicate model", _CHAT.replace("{", '{"model": "other", ', 1).encode()),
    _raw("deeply nested JSON", b"[" * _DEEP + b"]" * _DEEP),
    _raw(
        "deeply nested stop",
        _CHAT.replace("}", ', "stop": ' + "[" * 500 + "]" * 500 + "}", 1).encode(),
    ),
    _c("nested messages", chat(messages=[MSG])),
]
