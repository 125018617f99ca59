"""Forced and strict tool calls through the official SDK against real uvicorn, on a tiny
model with RANDOM weights (a chat template with a tools section, so the prompt fits its
context): the model never chooses to call a tool by itself, so every call that comes back
is the grammar engine's doing. It must be a call the parser reads, to an allowed tool, with
arguments valid against that tool's schema; whole and streamed, base model and adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from harness.models import build_llama
from harness.tool_model import TOOL_TEMPLATE

from tests.gateway.live import BASE, Gateway

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["C", "F"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ALARM = {
    "type": "object",
    "properties": {
        "at": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23},
               "minItems": 1, "maxItems": 3},
        "label": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
    },
    "required": ["at", "label"],
    "additionalProperties": False,
}  # fmt: skip
SCHEMAS: dict[str, dict[str, Any]] = {
    "weather": WEATHER,
    "alarm": ALARM,
    "now": {"type": "object", "maxProperties": 0},
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "alarm", "parameters": ALARM}},
    {"type": "function", "function": {"name": "now"}},  # no parameters: "{}"
]
ASK = [{"role": "user", "content": "Help me."}]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights; the compact tools template of harness.tool_model."""
    from transformers import AutoTokenizer

    path = build_llama(tmp_path_factory.mktemp("random-tools-llama"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def _check(name: str, arguments: str, allowed: set[str]) -> None:
    assert name in allowed, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("model", [BASE, "support"])
def test_a_named_choice_is_always_one_valid_call(gateway: Gateway, model: str) -> None:
    client = gateway.sdk("a")
    for seed in range(4):
        r = client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, seed=seed, max_tokens=120,
            tool_choice={"type": "function", "function": {"name": "alarm"}},
            parallel_tool_calls=False,
        )  # fmt: skip
        (choice,) = r.choices
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls or []
        _check(call.function.name, call.function.arguments, {"alarm"})
        assert not choice.message.content


def test_required_gives_valid_calls_of_the_offered_tools(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    names: set[str] = set()
    for seed in range(6):
        r = client.chat.completions.create(
            model=BASE, messages=ASK, tools=TOOLS, tool_choice="required", seed=seed,
            max_tokens=200, n=2,
        )  # fmt: skip
        for choice in r.choices:
            if choice.finish_reason == "length":  # several calls, cut off: the rest is text
                continue
            assert choice.finish_reason == "tool_calls", choice
            assert choice.message.tool_calls and not choice.message.content
            for call in choice.message.tool_calls:
                _check(call.function.name, call.function.arguments, set(SCHEMAS))
                names.add(call.function.name)
    assert len(names) >= 2, names  # not one tool the grammar happens to favour


def test_required_streamed(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    for seed in range(3):
        calls: dict[int, dict[str, str]] = {}
        reasons, content = [], ""
        stream = client.chat.completions.create(
            model="support", messages=ASK, tools=TOOLS, tool_choice="required", seed=seed,
            max_tokens=200, parallel_tool_calls=False, stream=True,
        )  # fmt: skip
        for chunk in stream:
            for c in chunk.choices:
                content += c.delta.content or ""
                for d in c.delta.tool_calls or ():
                    entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                    if d.function is not None:
                        entry["name"] += d.function.name or ""
                        entry["arguments"] += d.function.arguments or ""
                if c.finish_reason:
                    reasons.append(c.finish_reason)
        assert reasons == ["tool_calls"] and not content
        (call,) = calls.values()
        _check(call["name"], call["arguments"], set(SCHEMAS))


def test_strict_tools_under_auto_get_valid_arguments(gateway: Gateway) -> None:
    """Under ``auto`` the model may answer in text; a call it does make is schema-valid."""
    strict = [{"type": "function", "function": {**t["function"], "strict": True}} for t in TOOLS]
    client = gateway.sdk("a")
    for seed in range(6):
        r = client.chat.completions.create(
            model=BASE, messages=ASK, tools=strict, seed=seed, max_tokens=60
        )
        message = r.choices[0].message
        for call in message.tool_calls or ():
            _check(call.function.name, call.function.arguments, set(SCHEMAS))
        assert (
            "<tool_call>" not in (message.content or "") or r.choices[0].finish_reason == "length"
        )


def test_tools_the_engine_cannot_enforce_are_a_400(gateway: Gateway) -> None:
    bad = {"type": "object", "properties": {"x": {"type": "string", "format": "no-such"}}}
    tools = [{"type": "function", "function": {"name": "odd", "parameters": bad}}]
    with pytest.raises(openai.BadRequestError) as info:
        gateway.sdk("a").chat.completions.create(
            model=BASE, messages=ASK, tools=tools, tool_choice="required", max_tokens=4
        )  # type: ignore[arg-type]
    err = info.value.body
    assert isinstance(err, dict) and err["param"] == "tools", err
    assert "'odd'" in err["message"] and "format" in err["message"], err
    # not forced and not strict: the schema is only shown to the model, nothing to enforce
    r = gateway.sdk("a").chat.completions.create(
        model=BASE, messages=ASK, tools=tools, max_tokens=2
    )  # type: ignore[arg-type]
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
