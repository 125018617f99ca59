"""The values that cross the engine's boundary.

The gateway (or a benchmark, or a test) builds a :class:`Request`; the engine yields
:class:`RequestOutput` values back. Nothing here knows of tenants: an adapter is a content
key plus a callback that produces its PEFT directory on demand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from engine.errors import EngineError

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. Validation lives in :meth:`validate` (never ``assert``)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k >= 0 = sampled token + k alternatives
    n: int = 1

    def validate(self) -> None:
        from engine.errors import InvalidRequest

        checks: list[tuple[bool, str, str]] = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
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
            (len(self.stop) <= 8, "stop", "at most 8 stop sequences"),
        ]
        for ok, param, msg in checks:
            if not ok:
                raise InvalidRequest(f"{param} {msg}", param=param)


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter as the engine sees it.

    ``key`` identifies the exact weights (a content hash or version id): KV prefix caching
    and GPU slots are keyed by it, so two versions never share anything. ``fetch`` is
    called (in a worker thread, at most once per cold load) and returns a local directory
    holding ``adapter_config.json`` and ``adapter_model.safetensors``.
    """

    key: str
    fetch: Callable[[], Path]


@dataclass
class Request:
    request_id: str
    prompt: str | list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: AdapterRef | None = None


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
    completion_tokens: int  # so far, summed over the n choices
    cached_tokens: int  # prompt tokens served from the prefix cache
    finished: bool
    error: str | None = None  # set when finish_reason == "error"
    # the typed cause behind ``error`` (e.g. AdapterIncompatible -> 400, AdapterLoadError -> 503)
    exception: EngineError | None = None
