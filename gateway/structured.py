"""Structured outputs: ``response_format`` (and forced tool calls) -> the engine's grammar.

``text`` asks for nothing; ``json_object`` for any JSON object; ``json_schema`` for a value
of the given schema (``strict`` or not: the output always follows the schema, as OpenAI's
strict mode does). The engine enforces it by constrained decoding (``engine.structured``).

The gateway checks each schema before the request costs the engine anything, with the
grammar engine's own validator (no tokenizer needed): a schema it cannot enforce (an
unsupported keyword, a ``$ref`` that goes nowhere, a malformed schema) is a 400 that names
the problem, with ``param`` ``response_format``.
"""

from __future__ import annotations

import json
from typing import Any

from loraplex.engine.api import MAX_GRAMMAR_CHARS, Grammar
from loraplex.engine.grammar_spec import grammar_problem
from loraplex.gateway.schemas import (
    ResponseFormat,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
)
from loraplex.tenancy.errors import InvalidInput

PARAM = "response_format"


def grammar_of(response_format: ResponseFormat | None) -> Grammar | None:
    """The engine's grammar for ``response_format``; None for none or ``text``."""
    if isinstance(response_format, ResponseFormatJsonObject):
        return Grammar("json_object")
    if isinstance(response_format, ResponseFormatJsonSchema):
        schema = response_format.json_schema.schema_
        return schema_grammar({"type": "object"} if schema is None else schema)
    return None


def schema_grammar(schema: dict[str, Any], param: str = PARAM) -> Grammar:
    """A ``json_schema`` grammar, or InvalidInput (400) naming what the engine cannot do."""
    try:
        text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise InvalidInput(f"{param}: the schema is not valid JSON ({exc})", param=param) from None
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidInput(
            f"{param}: the schema is over {MAX_GRAMMAR_CHARS} characters of JSON", param=param
        )
    grammar = Grammar("json_schema", text)
    problem = grammar_problem(grammar)
    if problem:
        raise InvalidInput(f"{param}: the schema is not supported: {problem}", param=param)
    return grammar


def _function(tool: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    fn = tool.get("function") if tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidInput("tools: each tool must be a function with a name", param="tools")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise InvalidInput(
            f"tools: parameters of {fn['name']!r} must be a JSON schema object", param="tools"
        )
    return fn["name"], params


def _call_schema(name: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_call_schema(tools: list[dict[str, Any]], tool_choice: Any) -> dict[str, Any] | None:
    """The JSON schema of one forced tool call, ``{"name": ..., "arguments": {...}}`` (the
    body of a Hermes ``<tool_call>``), for ``tool_choice`` ``"required"`` (any of ``tools``)
    or ``{"type": "function", "function": {"name": ...}}`` (that one); None when nothing is
    forced (``"auto"``, ``"none"``, no choice). ``tools`` are OpenAI tool definitions as
    plain data. An unknown tool name or choice is a 400 (``param`` ``tool_choice``).
    Turn the schema into the engine's grammar with :func:`schema_grammar`."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    calls = dict(_function(t) for t in tools)
    if not calls:
        raise InvalidInput(
            "tool_choice: a tool call is required but no tools were given", param="tool_choice"
        )
    if tool_choice == "required":
        options = [_call_schema(n, p) for n, p in calls.items()]
        return options[0] if len(options) == 1 else {"anyOf": options}
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise InvalidInput(
            'tool_choice: must be "none", "auto", "required" or a named function',
            param="tool_choice",
        )
    if name not in calls:
        raise InvalidInput(f"tool_choice: no tool named {name!r}", param="tool_choice")
    return _call_schema(name, calls[name])
