"""What the engine core remembers of one request: its choices' new tokens and finish reasons.

The scheduler sees only :class:`Sequence` ints. The core reports token ids (and raw
logprobs); text, stop strings and token texts are the client side's work
(``engine.output_processor``), so nothing per token costs the step loop a decode.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from loraplex.engine.api import (
    ChoiceTokens,
    EngineOutput,
    FinishReason,
    Request,
    SamplingParams,
    TokenLogprobs,
)
from loraplex.engine.errors import EngineError, InvalidRequest, PromptTooLong, RequestFailed
from loraplex.engine.sampler import SampleRow
from loraplex.engine.sequence import Sequence

_U64 = (1 << 64) - 1


@dataclass(eq=False)
class Choice:
    seq: Sequence
    generator: torch.Generator | None = None
    row: SampleRow | None = None  # what the sampler reads, made at the first sample
    finish_reason: FinishReason | None = None
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    reported_finish: bool = False
    # structured outputs: this choice's grammar state (an llguidance matcher), fed each token
    matcher: Any = None
    matcher_grammar: Any = None  # the Grammar the matcher was made from
    may_think: int = -1  # the think-start token its first token may be (the grammar waits)
    thinking_until: int = -1  # inside a think block: the grammar waits for this token

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
    error: EngineError | None = None
    arrival_s: float = field(default_factory=time.perf_counter)
    embedding: bytes | None = None  # an embedding request's vector, once on the host
    grammar: Future[Any] | None = None  # its compiled grammar, while it is compiled
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
    def reads_history(self) -> bool:
        """Its sampling reads the tokens so far on the host (penalties)."""
        p = self.request.sampling
        return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)

    @property
    def finished(self) -> bool:
        for c in self.choices:  # (a loop: cheaper than all() over a generator, per step)
            if c.finish_reason is None:
                return False
        return True

    def on_token(
        self,
        choice: Choice,
        token_id: int,
        logprob: TokenLogprobs | None,
        index: int,
        max_model_len: int,
    ) -> None:
        """Account one sampled token, at ``index`` of the sequence's token ids (later
        ones may be placeholders of a step in flight); stop ids, length."""
        choice.new_token_ids.append(token_id)
        if logprob is not None:
            choice.new_logprobs.append(logprob)
        n = index + 1
        generated = n - choice.seq.prompt_len
        p = self.request.sampling
        m = choice.matcher
        if m is not None and (choice.thinking_until >= 0 or choice.may_think >= 0):
            m = self._think(choice, token_id, generated)
        if m is not None and not m.consume_token(token_id):  # the mask allowed it: a bug
            self.finish("error", RequestFailed(f"the grammar refused token {token_id}"))
        elif token_id in self._stop_ids and generated > p.min_tokens:
            choice.finish_reason = "stop"
        elif m is not None and m.is_stopped():  # the grammar allows nothing more
            choice.finish_reason = "stop"
        elif generated >= p.max_tokens or n >= max_model_len:
            choice.finish_reason = "length"

    @staticmethod
    def _think(choice: Choice, token_id: int, generated: int) -> Any:
        """A thinking model's think block: the grammar waits through it. -> the matcher to
        feed ``token_id`` to, or None (a token of the think block)."""
        if choice.thinking_until >= 0:
            if token_id == choice.thinking_until:
                choice.thinking_until = -1  # the grammar holds from the next token
            return None
        start, choice.may_think = choice.may_think, -1
        if generated == 1 and token_id == start:
            grammar = choice.matcher_grammar
            choice.thinking_until = grammar.think_end if grammar is not None else -1
            return None
        return choice.matcher

    def generator_for(self, index: int, device: torch.device) -> torch.Generator | None:
        """Choice ``index`` draws from ``seed + index`` (wrapped to 64 bits), if seeded."""
        seed = self.request.sampling.seed
        if seed is None:
            return None
        return torch.Generator(device=device).manual_seed((seed + index) & _U64)

    def finish(self, reason: FinishReason, error: EngineError | None = None) -> None:
        for c in self.choices:
            if c.finish_reason is None:
                c.finish_reason = reason
        if error is not None:
            self.error = error

    def take_output(self) -> EngineOutput | None:
        """The new tokens since the last call; None when there is nothing new to say."""
        deltas = []
        finished = True
        want_logprobs = self.request.sampling.logprobs is not None
        for i, c in enumerate(self.choices):
            reason = c.finish_reason
            done = reason is not None
            finished = finished and done
            final = done and not c.reported_finish
            if not (c.new_token_ids or final):
                continue
            deltas.append(
                ChoiceTokens(
                    i,
                    c.new_token_ids,
                    c.new_logprobs if want_logprobs else None,
                    reason if final else None,
                )
            )
            c.new_token_ids = []
            if want_logprobs:  # (otherwise the list stays empty and is never handed out)
                c.new_logprobs = []
            if final:
                c.reported_finish = True
        if not deltas:
            return None
        error = self.error.to_info() if finished and self.error is not None else None
        took = (time.perf_counter() - self.arrival_s) * 1000 if finished else 0.0
        return EngineOutput(
            self.request.request_id,
            deltas,
            len(self.prompt_ids),
            self.cached_tokens,
            finished,
            error,
            took,
            self.embedding if finished else None,
        )


def tokenize_prompt(tokenizer: Any, prompt: str | list[int], vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt))
    else:
        ids = list(prompt)
        if any(type(t) is not int or not 0 <= t < vocab_size for t in ids):
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


MAX_FAIRNESS_KEY_LEN = 256
MAX_FAIRNESS_WEIGHT = 1000.0
PRIORITY_TIERS = range(10)


def check_fairness(request: Request) -> None:
    """The fairness fields are in range (engine/fairness.py)."""
    key, w = request.fairness_key, request.fairness_weight
    if key is not None and len(key) > MAX_FAIRNESS_KEY_LEN:
        raise InvalidRequest(
            f"fairness_key is longer than {MAX_FAIRNESS_KEY_LEN} characters", param="fairness_key"
        )
    if not (isinstance(w, int | float) and math.isfinite(w) and 0 < w <= MAX_FAIRNESS_WEIGHT):
        raise InvalidRequest(
            f"fairness_weight must be in (0, {MAX_FAIRNESS_WEIGHT:g}]", param="fairness_weight"
        )
    if request.priority not in PRIORITY_TIERS:
        raise InvalidRequest("priority must be an integer in [0, 9]", param="priority")


def check_embed_fits(prompt_len: int, n: int, max_model_len: int, kv_tokens: int) -> None:
    """An embedding request: one choice, and its whole prompt fits the context and the KV
    pool (nothing is generated after it)."""
    if n != 1:
        raise InvalidRequest("an embedding request has exactly one choice (n=1)", param="n")
    if prompt_len > max_model_len:
        raise PromptTooLong(
            f"input ({prompt_len} tokens) exceeds the context of {max_model_len} tokens",
            param="input",
        )
    if prompt_len > kv_tokens:
        raise PromptTooLong(
            f"{prompt_len} tokens do not fit the KV cache ({kv_tokens})", param="input"
        )
