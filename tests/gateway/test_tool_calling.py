"""Tool calling with the official SDK against real uvicorn: call -> tool result -> answer,
whole and streamed, on a tiny model taught to call ``get_weather`` (harness.tool_model).
Its output is real generated tokens read by the real parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness.tool_model import ANSWER, ARGUMENTS, TOOLS, build_tool_llama, first_turn, second_turn

from tests.gateway.live import BASE, Gateway


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's servers run the tool-calling model."""
    return build_tool_llama(tmp_path_factory.mktemp("tool-llama"))


def test_round_trip(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    r = client.chat.completions.create(
        model=BASE, messages=first_turn(), tools=TOOLS, temperature=0
    )
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls", choice
    assert r.system_fingerprint
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == ARGUMENTS
    assert not choice.message.content

    final = client.chat.completions.create(
        model=BASE,
        messages=second_turn(call.id, call.function.arguments),  # type: ignore[arg-type]
        tools=TOOLS,
        temperature=0,
    )
    (answer,) = final.choices
    assert answer.message.content == ANSWER and answer.finish_reason == "stop"
    assert not answer.message.tool_calls


def test_round_trip_streamed(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    calls: dict[int, dict[str, Any]] = {}
    reasons, content = [], ""
    stream = client.chat.completions.create(
        model=BASE, messages=first_turn(), tools=TOOLS, temperature=0, stream=True
    )
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or d.id
                if d.function is not None:
                    entry["name"] += d.function.name or ""
                    entry["arguments"] += d.function.arguments or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert reasons == ["tool_calls"] and not content
    assert list(calls) == [0]
    call = calls[0]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == ARGUMENTS
    assert call["id"].startswith("call_")

    text = ""
    stream = client.chat.completions.create(
        model=BASE,
        messages=second_turn(call["id"], call["arguments"]),  # type: ignore[arg-type]
        tools=TOOLS,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        for c in chunk.choices:
            assert not c.delta.tool_calls
            text += c.delta.content or ""
    assert text == ANSWER


def test_a_cut_off_call_comes_back_as_text(gateway: Gateway) -> None:
    """Malformed output (here: the call cut off by max_tokens) is the text, not an error."""
    client = gateway.sdk("a")
    r = client.chat.completions.create(
        model=BASE, messages=first_turn(), tools=TOOLS, temperature=0, max_tokens=6
    )
    (choice,) = r.choices
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content and choice.message.content.startswith("<tool")
    streamed = "".join(
        c.delta.content or ""
        for chunk in client.chat.completions.create(
            model=BASE, messages=first_turn(), tools=TOOLS, temperature=0, max_tokens=6, stream=True
        )
        for c in chunk.choices
    )
    assert streamed == choice.message.content


def test_tool_choice(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("auto", "required", named):
        r = client.chat.completions.create(
            model=BASE, messages=first_turn(), tools=TOOLS, tool_choice=choice, temperature=0,  # type: ignore[arg-type]
            max_tokens=40,
        )  # fmt: skip
        assert r.choices[0].message.tool_calls or r.choices[0].message.content
    # "none": the tools are not offered, and the output is never read as a call
    r = client.chat.completions.create(
        model=BASE, messages=first_turn(), tools=TOOLS, tool_choice="none", temperature=0,
        max_tokens=40,
    )  # fmt: skip
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls"
    # the history's calls are rendered without tools offered too
    r = client.chat.completions.create(
        model=BASE, messages=second_turn("call_1", json.dumps(ARGUMENTS)), temperature=0,  # type: ignore[arg-type]
        max_tokens=4,
    )  # fmt: skip
    assert r.choices[0].message.content is not None


def _error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "unique"),
        ({"tools": [{"type": "function"}]}, "tools.0.function", "tools[0].function"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools.0.function.name",
            "",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice", "none"),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            "messages.0.tool_call_id",
            "messages[0].tool_call_id",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
            "messages.1.content",
            "content or tool_calls",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": 5}]},
            "messages.1.content",
            "messages[1].content: expected a string or a list of content parts",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"1": 101}}, "logit_bias", "less than or equal to 100"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop sequences"),
    ],
)
def test_bad_tool_requests(
    gateway: Gateway, fields: dict[str, Any], param: str, words: str
) -> None:
    body = {"model": BASE, "messages": first_turn(), "tools": TOOLS, "max_tokens": 2, **fields}
    with gateway.http("a") as http:
        err = _error(http.post("/v1/chat/completions", json=body))
    assert err["param"] == param, err
    assert words in err["message"], err
