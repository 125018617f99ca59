"""Random JSON schemas for structured-output tests and benchmarks, with a bound on the size
of any valid output.

``random_schema(rng)`` builds one schema from nested objects (required and optional
properties, no additional ones), arrays (``minItems``/``maxItems``), enums, unions
(``anyOf``, nullable types), bounded integers, booleans and strings with a ``maxLength``.
Every part is bounded, so ``max_output_bytes(schema)`` is an upper bound on the UTF-8 bytes
of the longest JSON value that validates, written with single-space separators at most (a string character may take an escape
such as ``\\u1234``: 6 bytes). Byte-level BPE tokens are at least one byte long, so a
request with ``max_tokens = max_output_bytes + 1`` always has room to finish its value and
its end-of-sequence token: a constrained output that ends with ``length`` is then a bug.
"""

from __future__ import annotations

import json
import random
from typing import Any

ESCAPED_CHAR_BYTES = 6  # "\u1234": the longest JSON spelling of one character
SEP = 2  # ", " and ": " (the engine's compact JSON has at most one space after a separator)
WORDS = ["id", "name", "kind", "size", "tags", "ok", "when", "score", "items", "note", "mode"]
ENUM_VALUES = ["red", "green", "blue", "on", "off", "a b", "x"]


def _leaf(rng: random.Random) -> dict[str, Any]:
    pick = rng.randrange(6)
    if pick == 0:
        return {"type": "string", "maxLength": rng.randint(1, 5)}
    if pick == 1:
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 900)}
    if pick == 2:
        return {"type": "boolean"}
    if pick == 3:
        return {"enum": rng.sample(ENUM_VALUES, rng.randint(1, 4))}
    if pick == 4:  # a union of two leaves
        return {"anyOf": [_leaf(rng), _leaf(rng)]}
    return {"type": ["string", "null"], "maxLength": rng.randint(1, 4)}


def _node(rng: random.Random, depth: int) -> dict[str, Any]:
    if depth <= 0 or rng.random() < 0.4:
        return _leaf(rng)
    if rng.random() < 0.35:
        lo = rng.randint(0, 1)
        return {
            "type": "array",
            "items": _node(rng, depth - 1),
            "minItems": lo,
            "maxItems": lo + rng.randint(0, 2),
        }
    return _object(rng, depth - 1)


def _object(rng: random.Random, depth: int) -> dict[str, Any]:
    names = rng.sample(WORDS, rng.randint(1, 3))
    props = {n: _node(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def random_schema(rng: random.Random, depth: int = 2) -> dict[str, Any]:
    """An object schema (nested objects, arrays, enums, unions, required/optional)."""
    return _object(rng, depth)


def schemas(count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [random_schema(rng) for _ in range(count)]


def _string_bytes(max_len: int) -> int:
    return 2 + ESCAPED_CHAR_BYTES * max_len


def max_output_bytes(schema: dict[str, Any]) -> int:
    """An upper bound on the bytes of a compact JSON value valid under ``schema`` (a schema
    of this module: every part bounded)."""
    if "anyOf" in schema:
        return max(max_output_bytes(s) for s in schema["anyOf"])
    if "enum" in schema:
        return max(len(json.dumps(v, ensure_ascii=False).encode()) for v in schema["enum"])
    kind = schema["type"]
    if isinstance(kind, list):
        return max(max_output_bytes({**schema, "type": k}) for k in kind)
    if kind == "string":
        return _string_bytes(schema["maxLength"])
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "boolean":
        return 5
    if kind == "null":
        return 4
    if kind == "array":
        n = schema["maxItems"]
        return 2 + n * max_output_bytes(schema["items"]) + SEP * max(0, n - 1)
    if kind == "object":
        props = schema["properties"]
        inner = sum(len(json.dumps(k)) + SEP + max_output_bytes(s) for k, s in props.items())
        return 2 + inner + SEP * max(0, len(props) - 1)
    raise ValueError(f"unbounded schema part: {schema}")
