"""What both engine clients do on their own event loop: one stream per request, fed a
whole step's outputs at a time, text made by the output processor.

A client delivers each step's :class:`EngineOutput` list with :meth:`ClientStreams.deliver`
(one call per step, never one per request); each request's tracker turns its output into a
:class:`RequestOutput` on that request's queue. Requests a stop string finished here are
returned so the client can abort what the engine still runs of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any

from loraplex.engine.api import EngineOutput, Request, RequestOutput
from loraplex.engine.errors import EngineDead, EngineError, InvalidRequest
from loraplex.engine.output_processor import OutputProcessor, RequestTracker


class _Stream:
    __slots__ = ("queue", "tracker")

    def __init__(self, tracker: RequestTracker) -> None:
        self.tracker = tracker
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()


class ClientStreams:
    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self.processor: OutputProcessor | None = None  # set once the tokenizer is known
        self.tokenizer: Any = None
        self.vocab_size = 0

    def __len__(self) -> int:
        return len(self._streams)

    def set_tokenizer(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.processor = OutputProcessor(tokenizer)

    def prepare(self, request: Request) -> list[int]:
        """Validate; a text prompt is tokenized here (the engine takes token ids)."""
        request.sampling.validate()
        if isinstance(request.prompt, str):
            if self.tokenizer is None:
                raise EngineDead("the engine is not ready")
            request.prompt = list(self.tokenizer.encode(request.prompt))
        vocab = self.vocab_size
        if any(type(t) is not int or not 0 <= t < vocab for t in request.prompt):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return request.prompt

    def deliver(self, outputs: list[EngineOutput]) -> list[str]:
        """One step's outputs to their streams. -> ids the engine should abort."""
        aborts = []
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue
            tracker = stream.tracker
            if tracker.finished:
                continue
            item = tracker.process(out)
            if item is not None:
                stream.queue.put_nowait(item)
            if tracker.finished:
                del streams[out.request_id]
                if tracker.needs_abort:
                    aborts.append(out.request_id)
        return aborts

    def fail_all(self, exc: EngineError) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(exc)
        self._streams.clear()

    async def stream(
        self,
        request: Request,
        send_add: Callable[[Request], None],
        send_abort: Callable[[str], None],
    ) -> AsyncGenerator[RequestOutput, None]:
        """The body of ``EngineClient.generate``."""
        if self.processor is None:
            raise EngineDead("the engine is not ready")
        prompt_ids = self.prepare(request)
        rid = request.request_id
        if rid in self._streams:
            raise EngineError(f"request id {rid!r} is already in use")
        stream = _Stream(self.processor.track(request, prompt_ids))
        self._streams[rid] = stream
        finished = False
        try:
            send_add(request)
            produced = False
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if finished and item.exception is not None and not produced:
                    if not any(d.token_ids for d in item.deltas):
                        raise item.exception  # the request's own error, before any token
                produced = True
                yield item
                if finished:
                    return
        finally:
            if self._streams.get(rid) is stream:
                del self._streams[rid]
            if not finished:
                send_abort(rid)
