"""Forced and strict tool calls as grammars (``gateway.tool_grammar``), compiled by
llguidance against the tiny model's real tokenizer: what they accept and refuse, and random
walks through the grammar (a random allowed token each step, as a random model samples)
that must always end in calls the parser reads, with arguments valid against the schemas."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import llguidance.hf
import pytest
from harness.models import build_tokenizer

from loraplex.engine.grammar_spec import grammar_text
from loraplex.gateway.chat_messages import plan_tools
from loraplex.gateway.schemas import ChatCompletionRequest
from loraplex.gateway.tool_grammar import tool_grammar
from loraplex.gateway.tool_parsers import parse
from loraplex.tenancy.errors import InvalidInput

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["C", "F"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"zone": {"$ref": "#/$defs/zone"}},
    "required": ["zone"],
    "additionalProperties": False,
    "$defs": {"zone": {"enum": ["UTC", "CET"]}},
}


def _tool(name: str, params: dict[str, Any] | None, strict: bool | None = None) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": name}
    if params is not None:
        fn["parameters"] = params
    if strict is not None:
        fn["strict"] = strict
    return {"type": "function", "function": fn}


TOOLS = [_tool("weather", WEATHER), _tool("clock", CLOCK), _tool("ping", None)]
SCHEMAS = {"weather": WEATHER, "clock": CLOCK, "ping": {"type": "object", "maxProperties": 0}}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, llguidance.LLTokenizer]:
    tok = build_tokenizer(Path(tmp_path_factory.mktemp("tok")))
    return tok, llguidance.hf.from_tokenizer(tok)


def _grammar(parser: str = "hermes", **fields: Any) -> str:
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, **fields}
    )
    plan = plan_tools(body, "", parser)
    grammar = tool_grammar(plan, body.response_format)
    assert grammar is not None
    return grammar_text(grammar)


def _accepts(tokenizers: Any, grammar: str, text: str) -> bool:
    tok, llg = tokenizers
    matcher = llguidance.LLMatcher(llg, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ids = tok.encode(text)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def _hermes(name: str, args: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


NAMED = {"tool_choice": {"type": "function", "function": {"name": "weather"}}}


def test_a_named_choice_takes_one_call_of_that_tool_with_valid_arguments(tokenizers: Any) -> None:
    g = _grammar(**NAMED, parallel_tool_calls=False)
    assert _accepts(tokenizers, g, _hermes("weather", {"city": "Oslo", "unit": "C"}))
    assert _accepts(tokenizers, g, _hermes("weather", {"city": "Oslo", "unit": "F", "days": 3}))
    for bad in (
        _hermes("clock", {"zone": "UTC"}),  # another tool
        _hermes("weather", {"city": "Oslo"}),  # a required argument missing
        _hermes("weather", {"city": "Oslo", "unit": "K"}),  # not in the enum
        _hermes("weather", {"city": "Reykjavik", "unit": "C"}),  # over maxLength
        _hermes("weather", {"city": "Oslo", "unit": "C", "x": 1}),  # additionalProperties
        "It is sunny.",  # text instead of a call
        _hermes("weather", {"city": "Oslo", "unit": "C"}) * 2,  # parallel_tool_calls false
    ):
        assert not _accepts(tokenizers, g, bad), bad


def test_required_takes_any_tool_and_several_calls(tokenizers: Any) -> None:
    g = _grammar(tool_choice="required")
    two = _hermes("clock", {"zone": "CET"}) + "\n" + _hermes("ping", {})
    assert _accepts(tokenizers, g, two)
    assert not _accepts(tokenizers, g, _hermes("ping", {"x": 1}))  # no parameters: none
    assert not _accepts(tokenizers, g, _hermes("clock", {"zone": "EST"}))  # $ref resolved
    assert not _accepts(tokenizers, g, _hermes("nope", {}))
    assert not _accepts(tokenizers, g, "")


def test_llama3_json_format(tokenizers: Any) -> None:
    g = _grammar("llama3_json", tool_choice="required")
    one = json.dumps({"name": "clock", "parameters": {"zone": "UTC"}})
    assert _accepts(tokenizers, g, one) and _accepts(tokenizers, g, f"{one}; {one}")
    assert not _accepts(tokenizers, g, json.dumps({"name": "clock", "arguments": {"zone": "UTC"}}))


def test_auto_with_a_strict_tool_allows_text_or_valid_calls(tokenizers: Any) -> None:
    tools = [_tool("weather", WEATHER, strict=True), _tool("ping", {"type": "object"})]
    g = _grammar(tools=tools, tool_choice="auto")
    good = _hermes("weather", {"city": "Oslo", "unit": "C"})
    assert _accepts(tokenizers, g, "It is sunny, <tool_call without a call.")
    assert _accepts(tokenizers, g, good)
    assert _accepts(tokenizers, g, "Let me look. " + good + "\n" + _hermes("ping", {"x": 1}))
    assert not _accepts(tokenizers, g, _hermes("weather", {"city": "Oslo"}))
    assert not _accepts(tokenizers, g, "Let me look. " + _hermes("weather", {"unit": "C"}))
    # with a response_format the answer is its JSON
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": CLOCK}}
    g = _grammar(tools=tools, response_format=fmt)
    assert _accepts(tokenizers, g, '{"zone": "UTC"}') and _accepts(tokenizers, g, good)
    assert not _accepts(tokenizers, g, "It is sunny.")


def test_no_grammar_without_a_forced_choice_or_strict_tool() -> None:
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    )
    assert tool_grammar(plan_tools(body, "", None), None) is None


def test_a_schema_the_engine_cannot_enforce_is_a_400_naming_the_tool() -> None:
    tools = [_tool("weather", {"type": "object", "properties": {"x": {"not": {}}}})]
    with pytest.raises(InvalidInput) as info:
        _grammar(tools=tools, tool_choice="required")
    assert info.value.param == "tools" and "'weather'" in info.value.message
    assert "not" in info.value.message


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
@pytest.mark.parametrize("choice", ["required", "named", "auto_strict"])
def test_random_walks_end_in_valid_calls(tokenizers: Any, parser: str, choice: str) -> None:
    """Every path through the grammar is a call the parser reads, with valid arguments."""
    tok, llg = tokenizers
    fields: dict[str, Any] = {"parallel_tool_calls": choice != "named"}
    if choice == "named":
        fields.update(NAMED)
    elif choice == "required":
        fields["tool_choice"] = "required"
    else:
        fields["tools"] = [_tool(n, s if n != "ping" else None, True) for n, s in SCHEMAS.items()]
    template = llguidance.LLMatcher(llg, _grammar(parser, **fields), log_level=0)
    calls_seen = 0
    for seed in range(20):
        rng, matcher, ids = random.Random(seed), template.deep_copy(), []
        if choice == "auto_strict" and seed % 2 == 0:  # text, then a call (else text only)
            ids = tok.encode("Sure. <tool_call>\n" if parser == "hermes" else "{")
            assert matcher.consume_tokens(ids)
        while not matcher.is_stopped() and len(ids) < 400:
            mask = matcher.compute_bitmask()
            allowed = [i for i in range(llg.vocab_size) if mask[i // 8] >> (i % 8) & 1]
            # end as soon as the grammar allows (else a walk may run on forever)
            token = llg.eos_token if llg.eos_token in allowed else rng.choice(allowed)
            assert matcher.consume_token(token), matcher.get_error()
            if token == llg.eos_token:
                break
            ids.append(token)
        text = tok.decode(ids)
        content, calls = parse(parser, text)  # type: ignore[arg-type]
        if choice != "auto_strict":
            assert calls and not content.strip(), text
        if choice == "named":
            assert [c.name for c in calls] == ["weather"]
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        calls_seen += len(calls)
    assert calls_seen > 0
