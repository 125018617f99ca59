"""Tool-call parsing per output format, whole and streamed in pieces; malformed output is
given back as text, never an error."""

from __future__ import annotations

import json

import pytest

from loraplex.gateway.tool_parsers import (
    Call,
    Content,
    Event,
    make_parser,
    parse,
    parser_for_template,
)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
ARGS = json.dumps({"city": "Paris", "unit": "C"})


def _streamed(name: str, text: str, step: int) -> tuple[str, list[Call]]:
    """The same text fed ``step`` characters at a time (tags split across deltas)."""
    parser = make_parser(name)  # type: ignore[arg-type]
    events: list[Event] = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i : i + step])
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    return content, [e for e in events if isinstance(e, Call)]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (f"<tool_call>\n{WEATHER}\n</tool_call>", "", [Call("get_weather", ARGS)]),
        (
            f"Let me check. <tool_call>{WEATHER}</tool_call>",
            "Let me check. ",
            [Call("get_weather", ARGS)],
        ),
        (
            f"<tool_call>{WEATHER}</tool_call>\n<tool_call>"
            '{"name": "now", "arguments": {}}</tool_call>',
            "",
            [Call("get_weather", ARGS), Call("now", "{}")],
        ),
        (f"<tool_call>\n{WEATHER}", "", [Call("get_weather", ARGS)]),  # stopped before the close
        # max_tokens cut the closing tag short: the call is whole
        (f"<tool_call>\n{WEATHER}\n</tool_call", "", [Call("get_weather", ARGS)]),
        (
            f"<tool_call>{WEATHER}</tool_call>\n<tool_call>{WEATHER}</",
            "",
            [Call("get_weather", ARGS), Call("get_weather", ARGS)],
        ),
        (
            "No tools needed: 1 < 2 and <tool_c is not a tag",
            "No tools needed: 1 < 2 and <tool_c is not a tag",
            [],
        ),
        ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
        (
            '<tool_call>{"arguments": {}}</tool_call>',
            '<tool_call>{"arguments": {}}</tool_call>',
            [],
        ),
        (
            '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
            '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
            [],
        ),
        ('<tool_call>{"name": "f", "argu', '<tool_call>{"name": "f", "argu', []),  # cut off
        (
            '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
            "",
            [Call("f", '{"a": 1}')],
        ),
        ("", "", []),
    ],
)
def test_hermes(text: str, content: str, calls: list[Call], step: int) -> None:
    assert parse("hermes", text) == (content, calls)
    assert _streamed("hermes", text, step) == (content, calls)


@pytest.mark.parametrize("step", [1, 4, 1000])
@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (
            '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}',
            "",
            [Call("get_weather", ARGS)],
        ),
        ('<|python_tag|>{"name": "f", "parameters": {}}', "", [Call("f", "{}")]),
        (
            '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": 1}}',
            "",
            [Call("f", "{}"), Call("g", '{"x": 1}')],
        ),
        ("The weather is fine.", "The weather is fine.", []),
        ('{"name": "f", "parameters": {', '{"name": "f", "parameters": {', []),
        ('{"city": "Paris"}', '{"city": "Paris"}', []),
        (
            '{"name": "f", "parameters": {}} trailing words',
            '{"name": "f", "parameters": {}} trailing words',
            [],
        ),
    ],
)
def test_llama3_json(text: str, content: str, calls: list[Call], step: int) -> None:
    assert parse("llama3_json", text) == (content, calls)
    assert _streamed("llama3_json", text, step) == (content, calls)


def test_parser_chosen_from_the_template() -> None:
    assert parser_for_template("{{ '<tool_call>' }}") == "hermes"
    assert parser_for_template("{{- '<|python_tag|>' }} ipython") == "llama3_json"
    assert parser_for_template("<|im_start|>{{ m.content }}") == "hermes"  # gateway's prompt
    assert parser_for_template(None) == "hermes"
    assert parser_for_template("{{ '<tool_call>' }}", "llama3_json") == "llama3_json"
    with pytest.raises(ValueError):
        parser_for_template("", "xml")
