"""Engine outputs -> a Responses API ``Response`` and its typed stream events.

One :class:`OutputBuilder` reads the completion's text as it comes (through the tool-call
parser when the request offered tools) into output items: a ``message`` with one
``output_text`` part, and ``function_call`` items. Each step returns the stream events it
makes (``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``, ... ``response.output_item.done``), so a whole response and a
streamed one are built by the same code. The stream's last event
(``response.completed``, ``response.incomplete`` or ``response.failed``) carries the whole
response with its usage, sent after the usage record is durable, as chat's last chunk is.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from loraplex.engine.api import RequestOutput
from loraplex.engine.errors import EngineError
from loraplex.gateway.chat_messages import ToolPlan
from loraplex.gateway.inference import EngineCall
from loraplex.gateway.render import tool_call_id
from loraplex.gateway.responses_schemas import (
    IncompleteDetails,
    InputTokensDetails,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    Response,
    ResponseError,
    ResponseUsage,
)
from loraplex.gateway.tool_parsers import Call, Content, Event, StreamParser, make_parser

EventDict = dict[str, Any]


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_usage(out: RequestOutput | None) -> ResponseUsage:
    prompt = out.prompt_tokens if out is not None else 0
    completion = out.completion_tokens if out is not None else 0
    return ResponseUsage(
        input_tokens=prompt,
        input_tokens_details=InputTokensDetails(cached_tokens=out.cached_tokens if out else 0),
        output_tokens=completion,
        output_tokens_details=OutputTokensDetails(),
        total_tokens=prompt + completion,
    )


class OutputBuilder:
    def __init__(self, plan: ToolPlan | None) -> None:
        self.items: list[OutputItem] = []
        self._parser: StreamParser | None = None
        if plan is not None and plan.parser is not None:
            self._parser = make_parser(plan.parser)
        self._parallel = plan is None or plan.parallel
        self._message: OutputMessage | None = None  # the open message item
        self.finish_reason: str | None = None

    def feed(self, text: str) -> list[EventDict]:
        if self._parser is None:
            return self._events([Content(text)] if text else [])
        return self._events(self._parser.feed(text) if text else [])

    def finish(self, reason: str) -> list[EventDict]:
        """The end of the output (``reason``: the engine's finish reason)."""
        self.finish_reason = reason
        events = self._events(self._parser.finish()) if self._parser is not None else []
        if not self.items:  # an empty answer is still a message
            events += self._open_message()
        return events + self._close_message()

    @property
    def incomplete(self) -> bool:
        return self.finish_reason == "length"

    def _events(self, parsed: list[Event]) -> list[EventDict]:
        events: list[EventDict] = []
        for event in parsed:
            if isinstance(event, Content):
                if self._message is None and not event.text.strip() and self._calls():
                    continue  # whitespace after calls
                events += self._open_message()
                assert self._message is not None
                self._message.content[0].text += event.text
                events.append(self._text_event("response.output_text.delta", delta=event.text))
            elif isinstance(event, Call) and (self._parallel or not self._calls()):
                events += self._close_message() + self._call(event)
        return events

    def _calls(self) -> int:
        return sum(isinstance(i, OutputFunctionCall) for i in self.items)

    def _open_message(self) -> list[EventDict]:
        if self._message is not None:
            return []
        self._message = OutputMessage(id=_id("msg"), status="in_progress", content=[])
        self.items.append(self._message)
        added = self._item_event("response.output_item.added", self._message)
        self._message.content.append(OutputText(text=""))
        part = {"type": "output_text", "text": "", "annotations": []}
        return [added, self._text_event("response.content_part.added", part=part)]

    def _close_message(self) -> list[EventDict]:
        message, self._message = self._message, None
        if message is None:
            return []
        text = message.content[0].text
        message.status = "incomplete" if self.incomplete else "completed"
        part = message.content[0].model_dump()
        return [
            self._text_event("response.output_text.done", text=text, item=message),
            self._text_event("response.content_part.done", part=part, item=message),
            self._item_event("response.output_item.done", message),
        ]

    def _call(self, call: Call) -> list[EventDict]:
        item = OutputFunctionCall(
            id=_id("fc"), call_id=tool_call_id(), name=call.name, arguments="", status="in_progress"
        )
        self.items.append(item)
        index = len(self.items) - 1
        added = self._item_event("response.output_item.added", item)
        item.arguments, item.status = call.arguments, "completed"
        where = {"item_id": item.id, "output_index": index}
        return [
            added,
            {"type": "response.function_call_arguments.delta", **where, "delta": call.arguments},
            {
                "type": "response.function_call_arguments.done",
                **where,
                "arguments": call.arguments,
                "name": call.name,
            },
            self._item_event("response.output_item.done", item),
        ]

    def _item_event(self, type_: str, item: OutputItem) -> EventDict:
        return {"type": type_, "output_index": self.items.index(item), "item": item.model_dump()}

    def _text_event(
        self, type_: str, item: OutputMessage | None = None, **fields: Any
    ) -> EventDict:
        message = item or self._message
        assert message is not None
        return {
            "type": type_,
            "item_id": message.id,
            "output_index": self.items.index(message),
            "content_index": 0,
            **({"logprobs": []} if type_.startswith("response.output_text") else {}),
            **fields,
        }


def build_response(
    id_: str,
    created: int,
    echo: dict[str, Any],
    builder: OutputBuilder | None,
    last: RequestOutput | None,
    error: str | None = None,
) -> Response:
    """The Response object: in progress (``builder`` None), failed (``error``), or done."""
    if builder is None:
        return Response(id=id_, created_at=created, status="in_progress", **echo)
    status: Literal["failed", "incomplete", "completed"] = (
        "failed" if error else "incomplete" if builder.incomplete else "completed"
    )
    return Response(
        id=id_,
        created_at=created,
        status=status,
        error=ResponseError(code="server_error", message=error) if error else None,
        incomplete_details=IncompleteDetails(reason="max_output_tokens")
        if status == "incomplete"
        else None,
        output=builder.items,
        usage=response_usage(last),
        **echo,
    )


def _sse(event: EventDict, seq: int) -> bytes:
    event = {**event, "sequence_number": seq}
    data = json.dumps(event, ensure_ascii=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


async def response_events(
    call: EngineCall, first: RequestOutput, echo: dict[str, Any], plan: ToolPlan | None
) -> AsyncIterator[bytes]:
    """The typed events of a streamed response, ending with its whole Response."""
    id_, created, seq = call.spec.request_id, int(time.time()), 0
    builder = OutputBuilder(plan)
    start = build_response(id_, created, echo, None, None).model_dump()
    for type_ in ("response.created", "response.in_progress"):
        yield _sse({"type": type_, "response": start}, seq)
        seq += 1
    out: RequestOutput | None = first
    error: str | None = None
    try:
        while out is not None:
            if out.finished:  # metered durably before the client sees the end
                await call.finish()
            for d in out.deltas:
                events = builder.feed(d.text)
                if d.finish_reason is not None:
                    events += builder.finish(d.finish_reason)
                for event in events:
                    yield _sse(event, seq)
                    seq += 1
            out = None if out.finished else await call.next()
    except EngineError as exc:  # the engine died mid-stream: say so in-band, then end
        await call.finish("error")
        error = exc.message
    await call.finish()
    last = call.last
    if error is None and last is not None and last.error is not None:
        error = f"generation failed: {last.error}"
    if error is None and builder.finish_reason not in ("stop", "length"):
        error = "the engine ended the response early"  # (aborted: e.g. shutting down)
    done = build_response(id_, created, echo, builder, last, error)
    kind = {"failed": "response.failed", "incomplete": "response.incomplete"}.get(
        done.status, "response.completed"
    )
    yield _sse({"type": kind, "response": done.model_dump()}, seq)
