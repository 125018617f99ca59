"""Tool calls enforced by the grammar engine: a chat request's :class:`ToolPlan` -> the
engine's :class:`Grammar` (llguidance's Lark form), in the wire format of the plan's parser.

- ``tool_choice`` ``required`` or a named function: the output is calls only, each to an
  offered tool (the named one), its arguments valid against that tool's ``parameters``
  (``strict`` or not). ``parallel_tool_calls: false``: exactly one call.
- ``auto`` with a ``strict: true`` tool: the output is either an answer (free text, or the
  ``response_format``'s JSON if one is given) or calls; a strict tool's arguments follow its
  schema, another tool's are any JSON object. Without a strict tool, ``auto`` is not
  constrained (only ``response_format`` is, if given).

Formats (``gateway.tool_parsers``): Hermes, ``<tool_call>\\n{"name": "f", "arguments":
{...}}\\n</tool_call>`` blocks separated by a newline (free text may come before the first);
Llama 3.1's JSON, ``{"name": "f", "parameters": {...}}`` separated by ``"; "``. The name is
written by the grammar; only the arguments are generated under a JSON schema, so a schema's
``$ref``/``$defs`` resolve against the tool's own ``parameters``.
"""

from __future__ import annotations

import json
from typing import Any

from loraplex.engine.api import MAX_GRAMMAR_CHARS, Grammar
from loraplex.engine.grammar_spec import JSON_OPTIONS, grammar_problem
from loraplex.gateway.chat_messages import ToolPlan
from loraplex.gateway.schemas import ResponseFormat, ResponseFormatJsonSchema, ResponseFormatText
from loraplex.gateway.structured import grammar_of, schema_grammar
from loraplex.gateway.tool_parsers import ParserName
from loraplex.gateway.tool_schemas import ToolDefinition
from loraplex.tenancy.errors import InvalidInput

ANY_OBJECT: dict[str, Any] = {"type": "object"}
# a function without ``parameters`` takes none (OpenAI: "an empty parameter list")
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
HERMES_OPEN, HERMES_CLOSE = "<tool_call>\n", "\n</tool_call>"
# free text that never writes a call's opening tag (Hermes), or never starts like a JSON
# call (Llama 3.1: the parser reads an output starting with "{" as calls)
_ANY = "(.|\\n)"
_TWO_TAGS = f"{_ANY}*<tool_call>{_ANY}*<tool_call>{_ANY}*"
_TEXT = {
    "hermes": f"/{_ANY}+/ & ~/{_ANY}*<tool_call>{_ANY}*/",
    "llama3_json": f"/{_ANY}+/ & ~/[ \\t\\n]*\\{{{_ANY}*/",
}


def _lit(text: str) -> str:
    """A Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def _json(schema: dict[str, Any]) -> str:
    """An inline ``%json`` rule body, written compactly as ``response_format`` output is."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def _parameters(tool: ToolDefinition, constrained: bool) -> dict[str, Any]:
    params = tool.function.parameters
    if not constrained:
        return ANY_OBJECT
    if params is None:
        return NO_PARAMETERS
    try:
        schema_grammar(params, param="tools")  # the keyword named, before the whole grammar
    except InvalidInput as exc:
        name = tool.function.name
        problem = exc.message.removeprefix("tools: ")
        raise InvalidInput(f"tools: the parameters of {name!r}: {problem}", param="tools") from None
    return params


def _rules(plan: ToolPlan, parser: ParserName) -> list[str]:
    """``call`` and one rule per tool (``call_<i>``: its name, then its arguments)."""
    key = "arguments" if parser == "hermes" else "parameters"
    rules = []
    for i, tool in enumerate(plan.tools):
        constrained = plan.forced or bool(tool.function.strict)
        args = _parameters(tool, constrained)
        head = f'{{"name": {json.dumps(tool.function.name)}, "{key}": '
        rules.append(f"call_{i}: {_lit(head)} args_{i} {_lit('}')}")
        rules.append(f"args_{i}: {_json(args)}")
    rules.insert(0, "call: " + " | ".join(f"call_{i}" for i in range(len(plan.tools))))
    return rules


def _answer(response_format: ResponseFormat | None) -> str:
    """The rule body of a text answer under ``auto``."""
    if response_format is None or isinstance(response_format, ResponseFormatText):
        return "TEXT"
    if isinstance(response_format, ResponseFormatJsonSchema):
        schema = response_format.json_schema.schema_
        return _json(ANY_OBJECT if schema is None else schema)
    return _json(ANY_OBJECT)


def lark_text(plan: ToolPlan, response_format: ResponseFormat | None = None) -> str:
    """The Lark grammar of ``plan``'s output (see the module's docstring)."""
    parser = plan.parser or "hermes"
    sep = "\n" if parser == "hermes" else "; "
    more = "" if not plan.parallel else f" ({_lit(sep)} call)*"
    answer = "" if plan.forced else _answer(response_format)
    lines: list[str] = []
    if parser == "hermes":
        block = f"{_lit(HERMES_OPEN)} call {_lit(HERMES_CLOSE)}"
        lines.append(f"block: {block}")
        many = "" if not plan.parallel else f" ({_lit(sep)} block)*"
        if answer == "TEXT":
            # text, then calls: the opening tag ends the text's lexeme (the lexer cannot end
            # a text lexeme once it has read the tag's first characters)
            lines.insert(0, f"start: answer | OPEN call {_lit(HERMES_CLOSE)}{many}")
            lines.append(f"OPEN: /{_ANY}*<tool_call>\\n/ & ~/{_TWO_TAGS}/")
        else:  # calls only, or (under a response_format) its JSON or calls
            lines.insert(0, f"start: {'answer | ' if answer else ''}block{many}")
    else:
        lines.insert(0, f"start: {'answer | ' if answer else ''}call{more}")
    if answer:
        lines.append(f"answer: {answer}")
        if answer == "TEXT":
            lines.append(f"TEXT: {_TEXT[parser]}")
    return "\n".join(lines + _rules(plan, parser))


def tool_grammar(plan: ToolPlan | None, response_format: ResponseFormat | None) -> Grammar | None:
    """The grammar of a chat request's output: its tool plan's when calls are forced or a
    tool is strict, else ``response_format``'s (None: unconstrained)."""
    if plan is None or plan.parser is None:
        return grammar_of(response_format)
    if not plan.forced and not any(t.function.strict for t in plan.tools):
        return grammar_of(response_format)
    text = lark_text(plan, response_format)
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidInput(
            f"tools: the tools' schemas are over {MAX_GRAMMAR_CHARS} characters of grammar",
            param="tools",
        )
    grammar = Grammar("lark", text)
    problem = grammar_problem(grammar)
    if problem:
        raise InvalidInput(f"tools: the tools cannot be enforced: {problem}", param="tools")
    return grammar
