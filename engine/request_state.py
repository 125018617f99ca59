"""What the engine remembers of one request: its choices' text, stops and pending deltas.

The scheduler sees only :class:`Sequence` ints; everything a client sees (text,
logprobs, finish reasons) is built here, one :class:`Choice` per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.api import (
    CompletionDelta,
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from engine.detokenizer import IncrementalDetokenizer, StopChecker, TokenPieces
from engine.errors import EngineError, InvalidRequest, PromptTooLong
from engine.sampler import SampleRow
from engine.sequence import Sequence


@dataclass(eq=False)
class Choice:
    seq: Sequence
    detok: IncrementalDetokenizer
    stops: StopChecker
    generator: torch.Generator | None = None
    row: SampleRow | None = None  # what the sampler reads, made at the first sample
    finish_reason: FinishReason | None = None
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    reported_finish: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class RequestState:
    request: Request
    prompt_ids: list[int]
    choices: list[Choice]
    eos_token_ids: frozenset[int]
    forked: bool = False  # the n-1 siblings got the first choice's prompt blocks
    cached_tokens: int = 0
    error: str | None = None
    exception: EngineError | None = None
    _stop_ids: frozenset[int] = field(init=False, repr=False)  # token ids that end a choice

    def __post_init__(self) -> None:
        p = self.request.sampling
        eos = frozenset() if p.ignore_eos else self.eos_token_ids
        self._stop_ids = eos.union(p.stop_token_ids)

    @property
    def params(self) -> SamplingParams:
        return self.request.sampling

    @property
    def adapter_key(self) -> str | None:
        return None if self.request.adapter is None else self.request.adapter.key

    @property
    def finished(self) -> bool:
        for c in self.choices:  # (a loop: cheaper than all() over a generator, per step)
            if c.finish_reason is None:
                return False
        return True

    def on_token(
        self, choice: Choice, token_id: int, logprob: TokenLogprob | None, max_model_len: int
    ) -> None:
        """Account one sampled token (already appended to the sequence) and check stops."""
        choice.new_token_ids.append(token_id)
        if logprob is not None:
            choice.new_logprobs.append(logprob)
        if token_id in self._stop_ids:
            choice.finish_reason = "stop"
            return
        if choice.stops.add(choice.detok.add(token_id)):
            choice.finish_reason = "stop"
            return
        seq = choice.seq
        n = len(seq.token_ids)
        if n - seq.prompt_len >= self.request.sampling.max_tokens or n >= max_model_len:
            choice.finish_reason = "length"
            if choice.stops.add(choice.detok.flush()):
                choice.finish_reason = "stop"

    def finish(self, reason: FinishReason, error: EngineError | None = None) -> None:
        for c in self.choices:
            if c.finish_reason is None:
                c.finish_reason = reason
        if error is not None:
            self.error, self.exception = error.message, error

    def take_output(self) -> RequestOutput | None:
        """The deltas since the last call; None when there is nothing new to say."""
        deltas = []
        finished, completion = True, 0
        want_logprobs = self.request.sampling.logprobs is not None
        for i, c in enumerate(self.choices):
            reason = c.finish_reason
            done = reason is not None
            finished = finished and done
            seq = c.seq
            completion += len(seq.token_ids) - seq.prompt_len
            final = done and not c.reported_finish
            text = c.stops.take(final=done)
            if not (c.new_token_ids or text or final):
                continue
            deltas.append(
                CompletionDelta(
                    index=i,
                    text=text,
                    token_ids=c.new_token_ids,
                    logprobs=c.new_logprobs if want_logprobs else None,
                    finish_reason=reason if final else None,
                )
            )
            c.new_token_ids = []
            if want_logprobs:  # (otherwise the list stays empty and is never handed out)
                c.new_logprobs = []
            if final:
                c.reported_finish = True
        if not deltas:
            return None
        return RequestOutput(
            request_id=self.request.request_id,
            deltas=deltas,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=completion,
            cached_tokens=self.cached_tokens,
            finished=finished,
            error=self.error if finished else None,
            exception=self.exception if finished else None,
        )


def make_logprob(
    pieces: TokenPieces, token_id: int, logprob: float, top_ids: list[int], top_lps: list[float]
) -> TokenLogprob:
    def text(i: int) -> str:
        return pieces.text(i, skip_special_tokens=False)

    return TokenLogprob(
        token_id=token_id,
        token=text(token_id),
        logprob=logprob,
        top=[(i, text(i), lp) for i, lp in zip(top_ids, top_lps, strict=True)],
    )


def tokenize_prompt(tokenizer: Any, prompt: str | list[int], vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt))
    else:
        ids = list(prompt)
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
            raise InvalidRequest("prompt token ids must be ints in [0, vocab_size)", param="prompt")
    if not ids:
        raise InvalidRequest("prompt is empty", param="prompt")
    return ids


def check_fits(prompt_len: int, max_tokens: int, max_model_len: int, kv_tokens: int) -> None:
    """PromptTooLong unless prompt + max_tokens fits the context and the whole KV pool."""
    total = prompt_len + max_tokens
    if prompt_len >= max_model_len or total > max_model_len:
        raise PromptTooLong(
            f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"context of {max_model_len} tokens",
            param="max_tokens" if prompt_len < max_model_len else "prompt",
        )
    if total > kv_tokens:
        raise PromptTooLong(
            f"{total} tokens do not fit the KV cache ({kv_tokens})", param="max_tokens"
        )
