"""A request's :class:`engine.api.Grammar` as llguidance grammar text, and its validation.

No torch and no tokenizer: the gateway calls :func:`grammar_problem` on every schema before
the request reaches the engine, and the engine compiles the same text (``engine.structured``).
JSON is generated compactly (no whitespace between tokens; ``", "`` and ``": "`` apart), so
a constrained output cannot pad itself with whitespace until ``max_tokens``. A keyword that
llguidance does not implement is an error (not ignored): what the engine accepts, it
enforces.

Why llguidance (not xgrammar): see docs/benchmarks.md, "Grammar engines".
"""

from __future__ import annotations

import llguidance

from loraplex.engine.api import Grammar

# compact JSON: the separators of ``json.dumps``'s default, and no other whitespace
JSON_OPTIONS: llguidance.JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
ANY_OBJECT = '{"type": "object"}'


def grammar_text(grammar: Grammar) -> str:
    """llguidance's grammar for ``grammar``; ValueError when the spec is not JSON."""
    if grammar.kind == "json_object":
        schema = ANY_OBJECT
    elif grammar.kind == "json_schema":
        schema = grammar.spec
    elif grammar.kind == "lark":
        return grammar.spec
    else:
        raise ValueError(f"unknown grammar kind {grammar.kind!r}")
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def grammar_problem(grammar: Grammar) -> str:
    """What is wrong with ``grammar`` for the engine; "" when nothing is."""
    try:
        text = grammar_text(grammar)
    except ValueError as exc:
        return str(exc)
    return llguidance.LLMatcher.validate_grammar(text)
