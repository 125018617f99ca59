"""Field types of the OpenAI requests, with the bounds one request may ask for.

Every bound here is checked while the body is validated, before anything is tokenized or
reaches the engine, so that one request's bad input fails that request alone:

- ``seed``: OpenAI's 64-bit range. A larger integer used to overflow in the engine's step
  loop and take the whole service down.
- ``stop``: at most 4 sequences (OpenAI's limit) of 1 to 1,000 characters each. The stop
  checker scans a window as long as the longest sequence after every token; nothing a
  caller can mean by a stop sequence needs more than a paragraph.
- text: never a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON but not Unicode; the
  tokenizer cannot encode it).
- ``messages``: at most 4,096, each with at most 256 content parts; a prompt's size is
  bounded again by the model's context before tokenizing (``gateway.prompt_budget``).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 1_000
MAX_MESSAGES = 4_096
MAX_CONTENT_PARTS = 256
MAX_NAME_CHARS = 256
MAX_LOGIT_BIAS = 300  # entries (OpenAI's limit)
MAX_STOP_TOKEN_IDS = 1024

_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(value: str) -> str:
    found = _SURROGATE.search(value)
    if found is not None:
        raise PydanticCustomError(
            "invalid_unicode",
            "contains a lone UTF-16 surrogate (U+{code}) at character {index}; "
            "text must be valid Unicode",
            {"code": f"{ord(found.group()):04X}", "index": found.start()},
        )
    return value


def _seed_in_range(value: int) -> int:
    if not SEED_MIN <= value <= SEED_MAX:
        raise PydanticCustomError(
            "seed_range",
            "must be an integer between {min} and {max}",
            {"min": SEED_MIN, "max": SEED_MAX},
        )
    return value


# Any text a request carries; bounded text puts ``VALID_UNICODE`` after its length bounds
# (after it, a bound would count "items").
VALID_UNICODE = AfterValidator(_valid_unicode)
Text = Annotated[str, VALID_UNICODE]
Seed = Annotated[
    int,
    AfterValidator(_seed_in_range),
    Field(json_schema_extra={"minimum": SEED_MIN, "maximum": SEED_MAX}),
]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), VALID_UNICODE]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(ge=1)]
StopSeq = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), VALID_UNICODE]


def _few_stops(value: list[str]) -> list[str]:
    if len(value) > MAX_STOP_SEQUENCES:
        raise PydanticCustomError(
            "too_many_stops",
            "at most {max} stop sequences are allowed, got {count}",
            {"max": MAX_STOP_SEQUENCES, "count": len(value)},
        )
    return value


Stop = (
    StopSeq
    | Annotated[
        list[StopSeq],
        AfterValidator(_few_stops),
        Field(json_schema_extra={"maxItems": MAX_STOP_SEQUENCES}),
    ]
)
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
StopTokenIds = Annotated[
    list[Annotated[int, Field(ge=0, lt=2**31)]], Field(max_length=MAX_STOP_TOKEN_IDS)
]


def _token_id_keys(value: dict[str, float]) -> dict[str, float]:
    for key in value:
        if not key.isascii() or not key.isdigit() or len(key) > 9:
            raise PydanticCustomError(
                "logit_bias_key",
                "keys must be token ids written as decimal strings (e.g. \"50256\"), not '{key}'",
                {"key": key[:20]},
            )
    return value


LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]],
    Field(max_length=MAX_LOGIT_BIAS),
    AfterValidator(_token_id_keys),
]

MAX_TEMPLATE_KWARGS = 16
# ``apply_chat_template``'s own arguments and what the gateway passes the template itself:
# a request's ``chat_template_kwargs`` may not replace them
RESERVED_TEMPLATE_KWARGS = frozenset(
    "messages tools documents add_generation_prompt continue_final_message tokenize padding "
    "truncation max_length return_tensors return_dict return_assistant_tokens_mask "
    "tokenizer_kwargs chat_template sanitize_control_tokens conversation conversations "
    "raise_exception strftime_now".split()
)
_TEMPLATE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _template_kwarg_keys(value: dict[str, object]) -> dict[str, object]:
    for key in value:
        bad = not _TEMPLATE_KEY.match(key) or key in RESERVED_TEMPLATE_KWARGS
        if bad or key.endswith(("_token", "_tokens")):
            raise PydanticCustomError(
                "template_kwarg",
                "'{key}' cannot be set: a key must be a template variable name, not one of "
                "apply_chat_template's own arguments or the tokenizer's special tokens",
                {"key": key[:64]},
            )
    return value


# vLLM's ``chat_template_kwargs`` (e.g. Qwen3's ``{"enable_thinking": false}``): flags and
# numbers only, so that no request text reaches the prompt unsanitized through a template
TemplateKwargs = Annotated[
    dict[str, bool | int | Annotated[float, Field(allow_inf_nan=False)] | None],
    Field(max_length=MAX_TEMPLATE_KWARGS),
    AfterValidator(_template_kwarg_keys),
]
