"""Engine outputs -> OpenAI response objects (whole responses and streaming chunks)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.api import CompletionDelta, RequestOutput, TokenLogprob
from gateway.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    PromptTokensDetails,
    TokenLogprobOut,
    TopLogprob,
    Usage,
)


def usage(out: RequestOutput | None) -> Usage:
    prompt = out.prompt_tokens if out is not None else 0
    completion = out.completion_tokens if out is not None else 0
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=out.cached_tokens if out is not None else 0
        ),
    )


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))


def chat_logprobs(items: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if items is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=t.token,
                logprob=t.logprob,
                bytes=list(t.token.encode()),
                top_logprobs=[_top(text, lp) for _, text, lp in t.top],
            )
            for t in items
        ]
    )


@dataclass
class TextLogprobs:
    """The legacy completions logprobs format, built up across outputs."""

    offset: int = 0
    value: CompletionLogprobs = field(default_factory=CompletionLogprobs)

    def add(self, items: list[TokenLogprob]) -> CompletionLogprobs:
        """Appends ``items``; returns a value holding just them (for a stream chunk)."""
        part = CompletionLogprobs()
        for t in items:
            part.tokens.append(t.token)
            part.token_logprobs.append(t.logprob)
            part.top_logprobs.append({text: lp for _, text, lp in t.top})
            part.text_offset.append(self.offset)
            self.offset += len(t.token)
        self.value.tokens.extend(part.tokens)
        self.value.token_logprobs.extend(part.token_logprobs)
        self.value.top_logprobs.extend(part.top_logprobs)
        self.value.text_offset.extend(part.text_offset)
        return part


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    chat_logprobs: list[TokenLogprob] = field(default_factory=list)
    text_logprobs: TextLogprobs = field(default_factory=TextLogprobs)
    finish_reason: str | None = None
    started: bool = False  # streaming: the role chunk went out


def finish_reason(delta: CompletionDelta) -> str | None:
    # "abort" and "error" are ours; the API knows stop and length.
    return delta.finish_reason if delta.finish_reason in (None, "stop", "length") else "stop"


class Choices:
    """The ``n`` choices of one request, accumulated from the engine's deltas."""

    def __init__(self, n: int) -> None:
        self.states = [ChoiceState() for _ in range(n)]

    def add(self, out: RequestOutput) -> None:
        for d in out.deltas:
            s = self.states[d.index]
            s.text.append(d.text)
            if d.logprobs:
                s.chat_logprobs.extend(d.logprobs)
                s.text_logprobs.add(d.logprobs)
            if d.finish_reason is not None:
                s.finish_reason = finish_reason(d)

    def chat(
        self, id_: str, created: int, model: str, out: RequestOutput, lp: bool
    ) -> ChatCompletion:
        return ChatCompletion(
            id=id_,
            created=created,
            model=model,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content="".join(s.text)),
                    logprobs=chat_logprobs(s.chat_logprobs) if lp else None,
                    finish_reason=s.finish_reason or "stop",
                )
                for i, s in enumerate(self.states)
            ],
            usage=usage(out),
        )

    def completion(
        self, id_: str, created: int, model: str, out: RequestOutput, lp: bool
    ) -> Completion:
        return Completion(
            id=id_,
            created=created,
            model=model,
            choices=[
                CompletionChoice(
                    index=i,
                    text="".join(s.text),
                    logprobs=s.text_logprobs.value if lp else None,
                    finish_reason=s.finish_reason or "stop",
                )
                for i, s in enumerate(self.states)
            ],
            usage=usage(out),
        )


def chat_chunks(
    id_: str, created: int, model: str, out: RequestOutput, states: list[ChoiceState], lp: bool
) -> list[ChatCompletionChunk]:
    """Chunks for one engine output: a role chunk first per choice, then its deltas."""
    chunks = []
    for d in out.deltas:
        s = states[d.index]
        if not s.started:
            s.started = True
            chunks.append(
                _chat_chunk(id_, created, model, d.index, Delta(role="assistant", content=""))
            )
        reason = finish_reason(d) if d.finish_reason is not None else None
        if d.text or d.logprobs or reason is not None:
            logprobs = chat_logprobs(d.logprobs or []) if lp else None
            delta = Delta(content=d.text) if d.text else Delta()
            chunks.append(_chat_chunk(id_, created, model, d.index, delta, logprobs, reason))
    return chunks


def _chat_chunk(
    id_: str,
    created: int,
    model: str,
    index: int,
    delta: Delta,
    logprobs: ChoiceLogprobs | None = None,
    reason: str | None = None,
) -> ChatCompletionChunk:
    choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)
    return ChatCompletionChunk(id=id_, created=created, model=model, choices=[choice])


def completion_chunks(
    id_: str, created: int, model: str, out: RequestOutput, states: list[ChoiceState], lp: bool
) -> list[Completion]:
    chunks = []
    for d in out.deltas:
        reason = finish_reason(d) if d.finish_reason is not None else None
        if not d.text and not d.logprobs and reason is None:
            continue
        logprobs = states[d.index].text_logprobs.add(d.logprobs or []) if lp else None
        choice = CompletionChoice(
            index=d.index, text=d.text, logprobs=logprobs, finish_reason=reason
        )
        chunks.append(Completion(id=id_, created=created, model=model, choices=[choice]))
    return chunks
