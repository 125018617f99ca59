"""The in-process :class:`engine.client.EngineClient`: the step loop in a thread of this
process, for tests and tools. The served path is ``engine.remote_client``.

Each step's outputs reach the event loop in ONE ``call_soon_threadsafe`` (not one per
request); the client side of the work (text, stop strings) runs there, as it does in a
remote client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from loraplex.engine.api import AdapterRef, AdapterResidency, EngineOutput, Request, RequestOutput
from loraplex.engine.client import EngineHealth, ModelInfo
from loraplex.engine.client_streams import ClientStreams
from loraplex.engine.config import EngineConfig
from loraplex.engine.errors import EngineDead
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.lora.loader import Fetch, local_fetch
from loraplex.engine.model_info import describe
from loraplex.engine.stats import EngineStats
from loraplex.engine.step_loop import StepLoop


class InprocEngineClient:
    def __init__(
        self,
        engine: LLMEngine | Callable[[], LLMEngine],
        *,
        name: str = "",
        model: str = "",
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        """``engine``: a built engine, or a factory run on the step thread. ``name`` and
        ``model`` (the served name, the model spec) are what ``model_info`` reports;
        ``metrics`` gives the engine side's Prometheus text."""
        factory = engine if callable(engine) and not isinstance(engine, LLMEngine) else None
        built = engine if isinstance(engine, LLMEngine) else None
        self._name, self._model = name, model
        self._metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams = ClientStreams()
        self._info: ModelInfo | None = None
        self._step = StepLoop(
            factory or (lambda: built),  # type: ignore[arg-type,return-value]
            self._emit,
            on_ready=self._on_ready,
            on_dead=self._on_dead,
        )

    @classmethod
    def from_model(
        cls,
        model: str | Path | None,
        config: EngineConfig,
        *,
        name: str = "",
        fetch: Fetch = local_fetch,
        metrics: Callable[[], bytes] | None = None,
    ) -> InprocEngineClient:
        """Build (on :meth:`start`, in the step thread) an engine for the model at ``model``."""
        return cls(
            lambda: LLMEngine.from_model(model, config, fetch=fetch),
            name=name,
            model="" if model is None else str(model),
            metrics=metrics,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._step.start()

    async def close(self) -> None:
        await asyncio.to_thread(self._step.shutdown)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the step loop from any thread: streams in flight end with ``abort``."""
        self._step.shutdown(timeout)

    def _on_ready(self, engine: LLMEngine) -> None:  # step thread
        self._info = describe(engine, name=self._name, model=self._model)
        self._streams.set_tokenizer(engine.tokenizer, engine.runner.vocab_size)

    def _on_dead(self, exc: BaseException) -> None:  # step thread
        if self._loop is not None and not self._loop.is_closed():
            dead = EngineDead(f"the engine step loop died: {exc}")
            self._loop.call_soon_threadsafe(self._streams.fail_all, dead)

    def _emit(self, outputs: list[EngineOutput]) -> None:  # step thread
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._deliver, outputs)
        except RuntimeError:  # the loop closed: nobody is listening
            pass

    def _deliver(self, outputs: list[EngineOutput]) -> None:
        aborts = self._streams.deliver(outputs)
        if aborts:
            self._step.abort(aborts)

    # -- the protocol --------------------------------------------------------------------

    def health(self) -> EngineHealth:
        if self._step.failure is not None:
            return EngineHealth("dead", f"the engine step loop died: {self._step.failure}")
        if self._step.is_ready:
            return EngineHealth("ready")
        if self._step.stopping:
            return EngineHealth("dead", "the engine is shut down")
        return EngineHealth("starting", "the model is loading")

    def model_info(self) -> ModelInfo | None:
        return self._info if self._step.is_ready else None

    def tokenizer(self) -> Any:
        return self._streams.tokenizer

    def stats(self) -> EngineStats | None:
        return self._step.stats() if self._info is not None else None

    def metrics_text(self) -> bytes:
        return b"" if self._metrics is None else self._metrics()

    @property
    def engine(self) -> LLMEngine | None:
        """The engine, for tests and tools; only the step thread may call into it."""
        return self._step.engine

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._step.wait_ready(timeout)

    def _check_alive(self) -> None:
        health = self.health()
        if health.state != "ready":
            raise EngineDead(health.detail or "the engine is not ready")

    def generate(self, request: Request) -> AsyncGenerator[RequestOutput, None]:
        self._check_alive()
        return self._streams.stream(request, self._step.add, lambda rid: self._step.abort([rid]))

    async def abort(self, request_id: str) -> None:
        self._step.abort([request_id])

    async def _call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        self._check_alive()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            def settle() -> None:
                if fut.done():
                    return
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)

            loop.call_soon_threadsafe(settle)

        self._step.call(fn, done)
        return await fut

    async def adapter_residency(self) -> AdapterResidency:
        result: AdapterResidency = await self._call(lambda e: e.adapter_residency())
        return result

    async def load_adapter(self, ref: AdapterRef) -> bool:
        return bool(await self._call(lambda e: e.load_adapter(ref)))

    async def unload_adapter(self, key: str) -> bool:
        return bool(await self._call(lambda e: e.unload_adapter(key)))
