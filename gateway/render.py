"""Engine outputs -> OpenAI response objects (whole responses and streaming chunks)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel
from starlette.responses import Response

from loraplex.engine.api import CompletionDelta, RequestOutput, TokenLogprob
from loraplex.gateway.chat_messages import ToolPlan
from loraplex.gateway.reasoning import ReasoningStream, split_reasoning
from loraplex.gateway.schemas import (
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
from loraplex.gateway.tool_parsers import Call, Content, Event, StreamParser, make_parser, parse
from loraplex.gateway.tool_schemas import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta

# Which build served a response (OpenAI's ``system_fingerprint``): the gateway's version.
SYSTEM_FINGERPRINT = "fp_loraplex"


def usage(out: RequestOutput | None, *more: RequestOutput | None) -> Usage:
    """The usage of one engine call's last output, or summed over several (one completions
    request with several prompts)."""
    outs = [o for o in (out, *more) if o is not None]
    prompt = sum(o.prompt_tokens for o in outs)
    completion = sum(o.completion_tokens for o in outs)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(o.cached_tokens for o in outs)),
    )


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def assistant_message(
    text: str, finish: str, plan: ToolPlan | None
) -> tuple[AssistantMessage, str]:
    """The message of a whole response and its finish reason: calls parsed out of the text
    when the request offered tools (text that does not parse stays content)."""
    if plan is None or plan.parser is None:
        return AssistantMessage(content=text), finish
    content, calls = parse(plan.parser, text)
    if not calls:
        return AssistantMessage(content=text), finish
    if not plan.parallel:
        calls = calls[:1]
    tool_calls = [
        ToolCall(id=tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in calls
    ]
    message = AssistantMessage(content=content.strip() or None, tool_calls=tool_calls)
    return message, "tool_calls" if finish == "stop" else finish


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
    parser: StreamParser | None = None  # streaming chat with tools: reads calls out of the text
    thinker: ReasoningStream | None = None  # streaming chat, thinking model: its think block
    calls: int = 0  # streaming: tool calls sent


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
        self,
        id_: str,
        created: int,
        model: str,
        out: RequestOutput,
        lp: bool,
        plan: ToolPlan | None = None,
        reasoning: bool = False,
    ) -> ChatCompletion:
        choices = []
        for i, s in enumerate(self.states):
            thought, text = (
                split_reasoning("".join(s.text)) if reasoning else (None, "".join(s.text))
            )
            message, reason = assistant_message(text, s.finish_reason or "stop", plan)
            if thought is not None:
                message.reasoning_content = thought
                message.content = message.content or None
            logprobs = chat_logprobs(s.chat_logprobs) if lp else None
            choices.append(
                ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=reason)
            )
        return ChatCompletion(
            id=id_,
            created=created,
            model=model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=choices,
            usage=usage(out),
        )

    def completion_choices(self, lp: bool) -> list[CompletionChoice]:
        return [
            CompletionChoice(
                index=i,
                text="".join(s.text),
                logprobs=s.text_logprobs.value if lp else None,
                finish_reason=s.finish_reason or "stop",
            )
            for i, s in enumerate(self.states)
        ]


def chat_chunks(
    id_: str,
    created: int,
    model: str,
    out: RequestOutput,
    states: list[ChoiceState],
    lp: bool,
    plan: ToolPlan | None = None,
    reasoning: bool = False,
) -> list[ChatCompletionChunk]:
    """Chunks for one engine output: a role chunk first per choice, then its deltas; with
    tools, text that forms a call goes out as a call (its name, then its arguments); with
    ``reasoning``, a think block as ``reasoning_content`` deltas (before any content)."""
    chunks = []

    def chunk(
        index: int, delta: Delta, logprobs: ChoiceLogprobs | None = None, reason: str | None = None
    ) -> None:
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)
        chunks.append(
            ChatCompletionChunk(
                id=id_,
                created=created,
                model=model,
                system_fingerprint=SYSTEM_FINGERPRINT,
                choices=[choice],
            )
        )

    for d in out.deltas:
        s = states[d.index]
        if not s.started:
            s.started = True
            if plan is not None and plan.parser is not None:
                s.parser = make_parser(plan.parser)
            s.thinker = ReasoningStream() if reasoning else None
            chunk(d.index, Delta(role="assistant", content=""))
        reason = finish_reason(d) if d.finish_reason is not None else None
        logprobs = chat_logprobs(d.logprobs) if lp and d.logprobs else None
        text, sent = d.text, False  # sent: this delta's logprobs went out with its reasoning
        if s.thinker is not None:
            pieces = s.thinker.feed(text) if text else []
            pieces += s.thinker.finish() if reason is not None else []
            text = "".join(t for kind, t in pieces if kind == "content")
            for thought in (t for kind, t in pieces if kind == "reasoning"):
                chunk(d.index, Delta(reasoning_content=thought), None if sent else logprobs)
                sent = True
        if s.parser is None:
            if text or (d.logprobs and not sent) or reason is not None:
                delta = Delta(content=text) if text else Delta()
                lps = chat_logprobs(d.logprobs or []) if lp and not sent else None
                chunk(d.index, delta, lps, reason)
            continue
        logprobs = None if sent else logprobs
        events: list[Event] = s.parser.feed(text) if text else []
        if reason is not None:
            events += s.parser.finish()
        for event in events:
            if isinstance(event, Content):
                chunk(d.index, Delta(content=event.text), logprobs)
                logprobs = None
            elif isinstance(event, Call) and (s.calls == 0 or plan is None or plan.parallel):
                head = ToolCallDelta(
                    index=s.calls,
                    id=tool_call_id(),
                    type="function",
                    function=FunctionCallDelta(name=event.name, arguments=""),
                )
                args = ToolCallDelta(
                    index=s.calls, function=FunctionCallDelta(arguments=event.arguments)
                )
                chunk(d.index, Delta(tool_calls=[head]), logprobs)
                chunk(d.index, Delta(tool_calls=[args]))
                logprobs = None
                s.calls += 1
        if logprobs is not None or reason is not None:
            if reason == "stop" and s.calls:
                reason = "tool_calls"
            chunk(d.index, Delta(), logprobs, reason)
    return chunks


def completion_chunks(
    id_: str,
    created: int,
    model: str,
    out: RequestOutput,
    states: list[ChoiceState],
    lp: bool,
    offset: int = 0,
    echo: str | None = None,
) -> list[Completion]:
    """``offset``: the index of this prompt's first choice; ``echo``: the prompt's text,
    sent first in each of its choices."""
    chunks = []

    def chunk(choice: CompletionChoice) -> None:
        chunks.append(
            Completion(
                id=id_,
                created=created,
                model=model,
                system_fingerprint=SYSTEM_FINGERPRINT,
                choices=[choice],
            )
        )

    for d in out.deltas:
        s = states[d.index]
        if not s.started:
            s.started = True
            if echo:
                chunk(CompletionChoice(index=offset + d.index, text=echo))
        reason = finish_reason(d) if d.finish_reason is not None else None
        if not d.text and not d.logprobs and reason is None:
            continue
        logprobs = s.text_logprobs.add(d.logprobs or []) if lp else None
        chunk(
            CompletionChoice(
                index=offset + d.index, text=d.text, logprobs=logprobs, finish_reason=reason
            )
        )
    return chunks


def model_response(model: BaseModel, headers: Mapping[str, str] | None = None) -> Response:
    """A whole response object as the HTTP response: serialized by pydantic's own JSON
    encoder (one pass in Rust, ~3x faster than ``model_dump`` then ``json.dumps``; a
    logprob of -inf, which ``json.dumps(allow_nan=False)`` refuses, becomes null)."""
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)
