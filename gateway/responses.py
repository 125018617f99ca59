"""``POST /v1/responses`` as a chat request: the Responses API's input items, instructions,
tools and text format become a chat completion request, run, tool-parsed, grammar-constrained
and metered by the very same code as ``/v1/chat/completions`` (``gateway.inference``).

No response is stored: ``store: true`` and ``previous_response_id`` are 400s (a client
sends the whole conversation as ``input``, its earlier output items included), and so is
``include`` of anything and ``truncation: "auto"``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from loraplex.gateway.responses_schemas import (
    FormatJsonObject,
    FormatJsonSchema,
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    NamedFunction,
    ResponsesRequest,
)
from loraplex.gateway.schemas import ChatCompletionRequest
from loraplex.tenancy.errors import DomainError, InvalidInput

# chat's names for the Responses API's fields, in errors raised while running the request
_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}


def check_unsupported(body: ResponsesRequest) -> None:
    if body.store:
        raise InvalidInput(
            "store: responses are not stored on this server; send store false (or leave it "
            "out) and pass the conversation's items as input",
            param="store",
        )
    if body.previous_response_id is not None:
        raise InvalidInput(
            "previous_response_id is not supported: responses are not stored on this "
            "server; pass the conversation's items (earlier output included) as input",
            param="previous_response_id",
        )
    if body.include:
        raise InvalidInput(f"include: {body.include[0]!r} is not supported", param="include")
    if body.truncation == "auto":
        raise InvalidInput(
            'truncation: only "disabled" is supported (an input over the context is a 400)',
            param="truncation",
        )


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """Chat messages: instructions as the system message, consecutive function calls as one
    assistant message's ``tool_calls``, call outputs as ``tool`` messages."""
    out: list[dict[str, Any]] = []
    if body.instructions is not None:
        out.append({"role": "system", "content": body.instructions})
    items = (
        [MessageItem(role="user", content=body.input)]
        if isinstance(body.input, str)
        else body.input
    )
    for item in items:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if not last["content"]:
                    last["content"] = None
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    fmt = body.text.format if body.text is not None else None
    if isinstance(fmt, FormatJsonObject):
        return {"type": "json_object"}
    if isinstance(fmt, FormatJsonSchema):
        spec = fmt.model_dump(by_alias=True, exclude_none=True, exclude={"type"})
        return {"type": "json_schema", "json_schema": spec}
    return None


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request that answers ``body``."""
    check_unsupported(body)
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": _messages(body),
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "response_format": _response_format(body),
        "user": body.user,
        "stream": body.stream,
    }
    if body.tools:
        fields["tools"] = [
            {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
            for t in body.tools
        ]
        fields["parallel_tool_calls"] = body.parallel_tool_calls
    choice = body.tool_choice
    if isinstance(choice, NamedFunction):
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        fields["tool_choice"] = choice
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:  # e.g. instructions + MAX_MESSAGES items: one too many
        err = exc.errors()[0]
        where = [str(p) for p in err["loc"][:1]]
        problem = InvalidInput(f"{'.'.join(where)}: {err['msg']}", param=".".join(where) or None)
        raise renamed(problem) from None


def renamed(exc: DomainError) -> DomainError:
    """``exc`` with chat's field names replaced by the Responses API's."""
    param = exc.param or ""
    head, _, rest = param.partition(".")
    if head in _PARAMS:
        new = _PARAMS[head]
        exc.param = new if head == "messages" else ".".join(p for p in (new, rest) if p)
        exc.message = exc.message.replace(head, new, 1)
        exc.args = (exc.message,)
    return exc


def echo_fields(body: ResponsesRequest) -> dict[str, Any]:
    """The request's settings as a Response object repeats them."""
    fmt = body.text.format if body.text is not None else None
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": body.model,
        "parallel_tool_calls": body.parallel_tool_calls,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "text": {
            "format": {"type": "text"}
            if fmt is None
            else fmt.model_dump(by_alias=True, exclude_none=True)
        },
        "tool_choice": (
            "auto"
            if body.tool_choice is None
            else body.tool_choice
            if isinstance(body.tool_choice, str)
            else body.tool_choice.model_dump()
        ),
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()],
        "metadata": body.metadata or {},
        "user": body.user,
    }
