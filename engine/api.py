"""The values that cross the engine's boundary.

A client (the gateway, a benchmark, a test) builds a :class:`Request`; the engine core
answers each step with :class:`EngineOutput` values (token ids, not text). The client side
(``engine.output_processor``) turns those into :class:`RequestOutput` values with text,
stop strings applied. Everything that crosses a process boundary is a ``msgspec.Struct``
of plain values (``engine.wire`` encodes them); nothing here knows of tenants, and
nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import msgspec

if TYPE_CHECKING:
    from loraplex.engine.errors import EngineError

FinishReason = Literal["stop", "length", "abort", "error"]
# "generate": sample tokens; "embed": prefill only, the answer is the pooled final hidden
# state (``EMBEDDING_POOLING``), one output with ``embedding`` set
Task = Literal["generate", "embed"]
# How an embedding is pooled, for every model the engine serves (decoder LMs): the final
# normed hidden state of the prompt's last token, L2-normalized, float32 (vLLM's default for
# decoder LMs). Last-token pooling needs no hidden state but the last one, so an embedding
# request prefills in chunks and hits the prefix cache like any prompt.
EMBEDDING_POOLING = "last"
EMBEDDING_NORMALIZE = True

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's seed is a signed 64-bit integer
MAX_STOPS = 16  # per request (the OpenAI API allows 4; the engine's own bound)
MAX_STOP_CHARS = 4096  # per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries per request
MAX_GRAMMAR_CHARS = 100_000  # a JSON schema's text (OpenAI's own limit is in this range)

GrammarKind = Literal["json_object", "json_schema", "lark"]


class Grammar(msgspec.Struct, frozen=True, array_like=True):
    """A constraint on a request's output, as plain data (``engine.structured`` compiles it,
    cached by value): ``json_object`` (any JSON object), ``json_schema`` (``spec``: the
    schema as JSON text, its property order kept: it is the order of generation) or
    ``lark`` (``spec``: an llguidance Lark grammar, e.g. forced tool calls in a parser's
    wire format, built by the gateway's ``tool_grammar``)."""

    kind: GrammarKind
    spec: str = ""
    # a thinking model (Qwen3): when the output begins with token ``think_start`` the
    # grammar waits until ``think_end`` has been generated (the think block is free text);
    # -1: the grammar holds from the first token
    think_start: int = -1
    think_end: int = -1


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Per-request sampling. Validation lives in :meth:`validate` (never ``assert``)."""

    max_tokens: int = 16
    min_tokens: int = 0  # no stop (eos, stop ids, stop strings) before this many tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # applied by the client side, on text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k >= 0 = sampled token + k alternatives
    n: int = 1
    # (token id, bias) pairs added to the logits before any other step (OpenAI's logit_bias)
    logit_bias: tuple[tuple[int, float], ...] = ()
    skip_special_tokens: bool = True  # in the output text (the token ids are unchanged)
    grammar: Grammar | None = None  # constrained decoding (structured outputs)

    def validate(self) -> None:
        from loraplex.engine.errors import InvalidRequest

        checks: list[tuple[bool, str, str]] = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be 0..max_tokens"),
            (0.0 <= self.temperature <= 2.0, "temperature", "must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be 0 (off) or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be between 0 and 1"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2"),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                "frequency_penalty",
                "must be between -2 and 2",
            ),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be 0..20"),
            (1 <= self.n <= 16, "n", "must be between 1 and 16"),
            (
                self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
                "seed",
                f"must be an integer between {SEED_MIN} and {SEED_MAX}",
            ),
            (len(self.stop) <= MAX_STOPS, "stop", f"at most {MAX_STOPS} stop sequences"),
            (
                all(len(s) <= MAX_STOP_CHARS for s in self.stop),
                "stop",
                f"each stop sequence at most {MAX_STOP_CHARS} characters",
            ),
            (
                len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
                "stop_token_ids",
                f"at most {MAX_STOP_TOKEN_IDS} ids",
            ),
            (
                len(self.logit_bias) <= MAX_LOGIT_BIAS,
                "logit_bias",
                f"at most {MAX_LOGIT_BIAS} entries",
            ),
            (
                all(-100.0 <= b <= 100.0 for _, b in self.logit_bias),
                "logit_bias",
                "each bias must be between -100 and 100",
            ),
            (
                self.grammar is None or len(self.grammar.spec) <= MAX_GRAMMAR_CHARS,
                "response_format",
                f"the schema is over {MAX_GRAMMAR_CHARS} characters of JSON",
            ),
        ]
        for ok, param, msg in checks:
            if not ok:
                raise InvalidRequest(f"{param} {msg}", param=param)


class AdapterRef(msgspec.Struct, frozen=True):
    """A LoRA adapter as the engine sees it: plain data.

    ``key`` identifies the exact weights (a content hash): KV prefix caching and GPU slots
    are keyed by it, so two versions never share anything. ``uri`` says where the engine
    side fetches them: ``store:<object key>`` (the engine's own object-store fetcher, built
    from the same settings as the gateway's store) or a local directory holding
    ``adapter_config.json`` and ``adapter_model.safetensors`` (tests, benchmarks).
    """

    key: str
    uri: str

    @classmethod
    def in_store(cls, key: str, storage_key: str) -> AdapterRef:
        return cls(key, f"store:{storage_key}")

    @property
    def storage_key(self) -> str | None:
        return self.uri[len("store:") :] if self.uri.startswith("store:") else None


class Request(msgspec.Struct):
    request_id: str
    prompt: str | list[int]  # token ids over the wire; text only in-process (tests, tools)
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    adapter: AdapterRef | None = None
    task: Task = "generate"  # "embed": ``sampling`` is not used (n must be 1)
    # fair scheduling (engine/fairness.py): an opaque key (the gateway sends the tenant),
    # its weight, and a priority tier, lower first (0 high, 1 standard, 2 batch)
    fairness_key: str | None = None
    fairness_weight: float = 1.0
    priority: int = 1


# ---- what the engine core sends back each step (token ids) --------------------------------


class TokenLogprobs(msgspec.Struct, array_like=True):
    """The sampled token's logprob and the top alternatives (ids, logprobs)."""

    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class ChoiceTokens(msgspec.Struct, array_like=True):
    """What one of the ``n`` choices produced since the previous output."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None


class ErrorInfo(msgspec.Struct, array_like=True):
    """An engine error as data: the class name of the typed error, its message and param."""

    kind: str
    message: str
    param: str | None = None


class EngineOutput(msgspec.Struct, array_like=True):
    request_id: str
    choices: list[ChoiceTokens]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    finished: bool
    error: ErrorInfo | None = None  # set when the request failed (finish_reason "error")
    engine_ms: float = 0.0  # on the last output: the engine's own time for the request
    # an "embed" request's one (finished) output: ``[hidden_size]`` little-endian float32
    embedding: bytes | None = None


# ---- what a client of the engine sees (text, after the output processor) -------------------


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob)


@dataclass
class CompletionDelta:
    """What one of the ``n`` choices produced since the previous output."""

    index: int
    text: str  # new text; never ends in a broken UTF-8 sequence
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None


@dataclass
class RequestOutput:
    request_id: str
    deltas: list[CompletionDelta]
    prompt_tokens: int
    completion_tokens: int  # so far, summed over the n choices (up to a stop string)
    cached_tokens: int  # prompt tokens served from the prefix cache
    finished: bool
    error: str | None = None  # set when finish_reason == "error"
    # the typed cause behind ``error`` (e.g. AdapterIncompatible -> 400, AdapterLoadError -> 503)
    exception: EngineError | None = None
    engine_ms: float = 0.0  # on the last output: from the engine taking the request to its end
    embedding: bytes | None = None  # an "embed" request's result (``EngineOutput.embedding``)


class AdapterResidency(msgspec.Struct):
    """Which adapter keys the engine holds where: GPU slots, host memory, being loaded."""

    gpu: list[str]
    host: list[str]
    loading: list[str]
