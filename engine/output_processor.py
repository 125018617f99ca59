"""The client side of the engine: token ids in, text out (no torch).

The engine core reports token ids each step (:class:`engine.api.EngineOutput`); a client
(in-process or remote, ``engine.client_streams``) keeps one :class:`RequestTracker` per
request that decodes them incrementally, applies stop strings (truncating the text, and
ending the choice: the client then aborts the rest on the engine side), attaches the
tokens' texts to logprobs and counts completion tokens up to a stop. This is where vLLM
puts it too (its API server detokenizes), so that nothing per token costs the step loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraplex.engine.api import (
    ChoiceTokens,
    CompletionDelta,
    EngineOutput,
    FinishReason,
    Request,
    RequestOutput,
    TokenLogprob,
)
from loraplex.engine.detokenizer import (
    IncrementalDetokenizer,
    StopChecker,
    TokenPieces,
    fast_decoder,
)
from loraplex.engine.errors import error_from_info


class OutputProcessor:
    """Per client: the tokenizer's decoder and each token's text, decoded once."""

    def __init__(self, tokenizer: Any) -> None:
        self.decoder = fast_decoder(tokenizer)
        self.pieces = TokenPieces(self.decoder)

    def track(self, request: Request, prompt_ids: list[int]) -> RequestTracker:
        p = request.sampling
        choices = [
            _ChoiceText(
                IncrementalDetokenizer(
                    self.decoder,
                    prompt_ids,
                    skip_special_tokens=p.skip_special_tokens,
                    pieces=self.pieces,
                ),
                StopChecker(p.stop),
            )
            for _ in range(p.n)
        ]
        return RequestTracker(request, choices, self.pieces)


@dataclass(eq=False)
class _ChoiceText:
    detok: IncrementalDetokenizer
    stops: StopChecker
    tokens: int = 0  # generated tokens counted so far (up to a stop string)
    finish_reason: FinishReason | None = None
    reported_finish: bool = False
    engine_done: bool = False  # the engine reported this choice finished
    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)


class RequestTracker:
    def __init__(self, request: Request, choices: list[_ChoiceText], pieces: TokenPieces):
        self.request = request
        self.choices = choices
        self._pieces = pieces
        self._min_tokens = request.sampling.min_tokens
        self._want_logprobs = request.sampling.logprobs is not None
        self.finished = False

    @property
    def needs_abort(self) -> bool:
        """Done here (stop strings) while the engine still runs a choice: tell it."""
        return self.finished and not all(c.engine_done for c in self.choices)

    def process(self, out: EngineOutput) -> RequestOutput | None:
        """One engine output -> the client's output (None when it says nothing new)."""
        for d in out.choices:
            if 0 <= d.index < len(self.choices):
                self._feed(self.choices[d.index], d)
        error = exception = None
        if out.finished:
            for c in self.choices:
                c.engine_done = True
                if c.finish_reason is None:  # (an engine that ended the whole request)
                    c.finish_reason = "error" if out.error is not None else "abort"
            if out.error is not None:
                exception = error_from_info(out.error)
                error = exception.message
        return self._take(out, error, exception)

    def _feed(self, c: _ChoiceText, d: ChoiceTokens) -> None:
        if d.finish_reason is not None:
            c.engine_done = True
        if c.finish_reason is not None:
            return  # a stop string ended it here; what the engine made after is dropped
        lps = d.logprobs if self._want_logprobs else None
        text = self._pieces.text
        for k, token in enumerate(d.token_ids):
            c.tokens += 1
            c.new_ids.append(token)
            if lps is not None and k < len(lps):
                lp = lps[k]
                c.new_logprobs.append(
                    TokenLogprob(
                        lp.token_id,
                        text(lp.token_id),
                        lp.logprob,
                        [(i, text(i), v) for i, v in zip(lp.top_ids, lp.top_logprobs, strict=True)],
                    )
                )
            piece = c.detok.add(token)
            if c.stops.add(piece) and c.tokens >= self._min_tokens:
                c.finish_reason = "stop"
                return
        if d.finish_reason is not None:
            c.finish_reason = d.finish_reason
            if d.finish_reason == "length" and c.stops.add(c.detok.flush()):
                c.finish_reason = "stop"

    def _take(self, out: EngineOutput, error: str | None, exception: Any) -> RequestOutput | None:
        deltas = []
        finished, completion = True, 0
        for i, c in enumerate(self.choices):
            reason = c.finish_reason
            done = reason is not None
            finished = finished and done
            completion += c.tokens
            final = done and not c.reported_finish
            text = c.stops.take(final=done)
            if not (c.new_ids or text or final):
                continue
            deltas.append(
                CompletionDelta(
                    index=i,
                    text=text,
                    token_ids=c.new_ids,
                    logprobs=c.new_logprobs if self._want_logprobs else None,
                    finish_reason=reason if final else None,
                )
            )
            c.new_ids = []
            if self._want_logprobs:
                c.new_logprobs = []
            if final:
                c.reported_finish = True
        self.finished = finished
        if not deltas and not (finished and error is not None):
            return None
        return RequestOutput(
            request_id=out.request_id,
            deltas=deltas,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=completion,
            cached_tokens=out.cached_tokens,
            finished=finished,
            error=error if finished else None,
            exception=exception if finished else None,
            engine_ms=out.engine_ms,
            embedding=out.embedding if finished else None,
        )
