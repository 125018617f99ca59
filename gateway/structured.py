"""Structured outputs: ``response_format`` -> the engine's grammar (forced and strict tool
calls: ``gateway.tool_grammar``).

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
