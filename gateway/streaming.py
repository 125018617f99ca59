"""Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.

The request's usage is durable (in the outbox) before the last chunk and ``[DONE]`` are
sent: a response that a client saw complete is always billed; a crash in between is at
worst billed and not delivered, never the reverse. A client that disconnects cancels the
stream (Starlette listens for ``http.disconnect``); :class:`EngineStream` then finishes the
call, which aborts the engine request (its KV blocks are freed) and records the usage so
far with status ``aborted``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from loraplex.engine.api import RequestOutput
from loraplex.engine.errors import EngineError
from loraplex.gateway.errors import engine_error_kind
from loraplex.gateway.inference import EngineCall
from loraplex.gateway.render import SYSTEM_FINGERPRINT, ChoiceState, usage
from loraplex.gateway.schemas import ChatCompletionChunk, Completion

DONE = b"data: [DONE]\n\n"

ChunkMaker = Callable[[RequestOutput, list[ChoiceState]], Sequence[BaseModel]]
UsageChunk = Callable[..., BaseModel]  # (the calls' last outputs) -> the usage chunk


def sse(obj: BaseModel) -> bytes:
    return b"data: " + obj.model_dump_json().encode() + b"\n\n"


def sse_error(message: str, exc: EngineError | None = None) -> bytes:
    """An in-band error event, typed like the status the error would have had before the
    stream began (e.g. an engine gone: ``service_unavailable``/``engine_unavailable``)."""
    _, type_, code = (
        engine_error_kind(exc) if exc is not None else (500, "server_error", "engine_error")
    )
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def events(
    call: EngineCall,
    first: RequestOutput,
    chunks: ChunkMaker,
    usage_chunk: UsageChunk | None,
) -> AsyncIterator[bytes]:
    async for b in events_of([(call, first, chunks)], usage_chunk):
        yield b


async def events_of(
    calls: Sequence[tuple[EngineCall, RequestOutput, ChunkMaker]],
    usage_chunk: UsageChunk | None,
) -> AsyncIterator[bytes]:
    """The events of one or more started calls (a completions request with several
    prompts), one call after the other: the engine runs them all at once meanwhile."""
    lasts: list[RequestOutput | None] = []
    for call, first, chunks in calls:
        states = [ChoiceState() for _ in range(call.spec.sampling.n)]
        out: RequestOutput | None = first
        try:
            while out is not None:
                if out.finished:  # metered durably before the client sees the end
                    await call.finish()
                for chunk in chunks(out, states):
                    yield sse(chunk)
                out = None if out.finished else await call.next()
        except EngineError as exc:  # the engine died mid-stream: say so in-band, then end
            await call.finish("error")
            yield sse_error(exc.message, exc)
            yield DONE
            return
        await call.finish()  # (a no-op unless the engine ended the stream without a last output)
        last = call.last
        if last is not None and last.error is not None:
            yield sse_error(f"generation failed: {last.error}", last.exception)
            yield DONE
            return
        lasts.append(last)
    if usage_chunk is not None:
        yield sse(usage_chunk(*lasts))
    yield DONE


def chat_usage_chunk(id_: str, created: int, model: str) -> UsageChunk:
    def make(*lasts: RequestOutput | None) -> BaseModel:
        return ChatCompletionChunk(
            id=id_,
            created=created,
            model=model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[],
            usage=usage(*lasts),
        )

    return make


def completion_usage_chunk(id_: str, created: int, model: str) -> UsageChunk:
    def make(*lasts: RequestOutput | None) -> BaseModel:
        return Completion(
            id=id_,
            created=created,
            model=model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[],
            usage=usage(*lasts),
        )

    return make


class EngineStream(StreamingResponse):
    """An SSE response that always finishes its engine calls, however the stream ends."""

    def __init__(self, call: EngineCall | list[EngineCall], body: AsyncIterator[bytes]) -> None:
        self._calls = call if isinstance(call, list) else [call]
        headers = {
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **self._calls[0].headers,
        }
        super().__init__(body, media_type="text/event-stream", headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for call in self._calls:  # no-op after a complete stream; else status aborted
                await call.finish()
