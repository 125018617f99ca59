"""The engine core and its client side in one synchronous object, for offline use (tests,
benchmarks, tools): ``add_request``, then ``step() -> list[RequestOutput]`` with text and
stop strings applied, as a served client would see them."""

from __future__ import annotations

from loraplex.engine.api import Request, RequestOutput
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.output_processor import OutputProcessor, RequestTracker
from loraplex.engine.stats import EngineStats


class OfflineEngine:
    def __init__(self, core: LLMEngine) -> None:
        self.core = core
        self._processor = OutputProcessor(core.tokenizer)
        self._trackers: dict[str, RequestTracker] = {}

    def add_request(self, request: Request) -> None:
        request.sampling.validate()
        if isinstance(request.prompt, str):
            request.prompt = list(self.core.tokenizer.encode(request.prompt))
        self.core.add_request(request)
        self._trackers[request.request_id] = self._processor.track(request, request.prompt)

    def step(self) -> list[RequestOutput]:
        outputs = []
        for out in self.core.step():
            tracker = self._trackers.get(out.request_id)
            if tracker is None:
                continue
            item = tracker.process(out)
            if item is not None:
                outputs.append(item)
            if tracker.finished:
                del self._trackers[out.request_id]
                if tracker.needs_abort:
                    self.core.abort(out.request_id)
        return outputs

    def abort(self, request_id: str) -> bool:
        return self.core.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._trackers) or self.core.has_unfinished()

    @property
    def last_step_ran(self) -> bool:
        return self.core.last_step_ran

    def stats(self) -> EngineStats:
        return self.core.stats()

    def shutdown(self) -> None:
        self.core.shutdown()
