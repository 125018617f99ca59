"""The engine core and its client side in one synchronous object, for offline use (tests,
benchmarks, tools): ``add_request``, then ``step() -> list[RequestOutput]`` with text and
stop strings applied, as a served client would see them; and :func:`run_requests`, which
drives the core itself over a list of requests."""

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


def run_requests(
    engine: LLMEngine, requests: list[Request], in_flight: int | None = None
) -> tuple[dict[str, list[int]], dict[str, str], dict[str, str]]:
    """Step ``engine`` until ``requests`` are done: all submitted at once, or a closed loop
    of at most ``in_flight`` (a finished request replaced by the next). -> (token ids,
    finish reason, error) by request id; a request that failed has an error."""
    queue = list(reversed(requests))
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finish: dict[str, str] = {}
    errors: dict[str, str] = {}
    running = 0
    while queue or engine.has_unfinished():
        while queue and (in_flight is None or running < in_flight):
            engine.add_request(queue.pop())
            running += 1
        for out in engine.step():
            for c in out.choices:
                tokens[out.request_id] += c.token_ids
                if c.finish_reason is not None:
                    finish[out.request_id] = c.finish_reason
            if out.error is not None:
                errors[out.request_id] = str(out.error)
            if out.finished:
                running -= 1
    return tokens, finish, errors
