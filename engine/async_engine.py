"""The asyncio front: ``generate()`` streams outputs while a thread drives the step loop.

The step thread owns the :class:`LLMEngine` outright; the event loop talks to it through
a command queue (add, abort) and gets outputs back with ``call_soon_threadsafe``. Errors
that concern one request (bad sampling values, a prompt too long, overload) are raised
from that request's ``generate()``; if the step loop itself dies, every stream and every
later call raises :class:`EngineDead`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from engine.api import Request, RequestOutput
from engine.config import EngineConfig
from engine.errors import EngineDead
from engine.llm_engine import LLMEngine
from engine.stats import EngineStats

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # nothing to do: how long to sleep before looking again
_LOADING_WAIT_S = 0.02  # only waiting on adapter loads


class _Stream:
    """One request's outputs, handed from the step thread to the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        """``engine``: a built engine, or a factory run on the step thread by :meth:`start`."""
        self._factory = engine if callable(engine) and not isinstance(engine, LLMEngine) else None
        self._engine: LLMEngine | None = engine if isinstance(engine, LLMEngine) else None
        self._commands: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._stop = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._streams: dict[str, _Stream] = {}  # step thread only
        self._stats = EngineStats()

    @classmethod
    def from_model(cls, model: str | Path | None, config: EngineConfig) -> AsyncEngine:
        """Build (on :meth:`start`, in the step thread) an engine for the model at ``model``."""
        return cls(lambda: LLMEngine.from_model(model, config))

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_ready(self) -> bool:
        """Built, looping and not dead: fit to take traffic."""
        return self._ready.is_set() and self._dead is None and not self._stop

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    @property
    def failure(self) -> BaseException | None:
        """Why the engine is dead (the model failed to load, the step loop raised), if it is."""
        return self._dead

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until ready (or dead); True when ready."""
        self._ready.wait(timeout)
        return self.is_ready

    def stats(self) -> EngineStats:
        """The counters as of the last step (a snapshot; cheap, any thread)."""
        return self._stats

    @property
    def engine(self) -> LLMEngine | None:
        """The engine, for tests and tools; only the step thread may call into it."""
        return self._engine

    # -- requests ----------------------------------------------------------------------

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; the last has ``finished=True``.

        Raises the request's own typed error (``InvalidRequest``, ``PromptTooLong``,
        ``EngineOverloaded``) on the first iteration, ``EngineDead`` if the engine dies.
        Leaving the iteration early (client gone) aborts the request.
        """
        self._check_alive()
        request.sampling.validate()
        stream = _Stream(asyncio.get_running_loop())
        self._commands.put(("add", request, stream))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Ask the step loop to stop a request (from any thread); its stream then ends."""
        self._commands.put(("abort", request_id, None))
        self._wake.set()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDead(f"the engine step loop died: {self._dead}")
        if self._stop:
            raise EngineDead("the engine is shut down")
        if self._thread is None:
            raise EngineDead("the engine was not started")

    # -- the step thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._engine is None and self._factory is not None:
                self._engine = self._factory()
            engine = self._engine
            if engine is None:
                raise RuntimeError("no engine")
            engine.loader.on_done = self._wake.set
            self._stats = engine.stats()
            self._ready.set()
            while not self._stop:
                self._wake.clear()
                self._drain_commands(engine)
                if not engine.has_unfinished():
                    self._wake.wait(_IDLE_WAIT_S)
                    continue
                self._deliver(engine.step())
                self._stats = engine.stats()
                if not engine.last_step_ran:
                    self._wake.wait(_LOADING_WAIT_S)
        except BaseException as exc:
            log.exception("engine step loop died")
            self._dead = exc
        finally:
            self._ready.set()
            if self._engine is not None and self._dead is None:
                self._drain_commands(self._engine)
                self._deliver(self._engine.abort_all())  # shutdown: streams end with "abort"
                self._stats = self._engine.stats()
            self._close_streams()
            if self._engine is not None:
                self._engine.shutdown()

    def _drain_commands(self, engine: LLMEngine) -> None:
        while True:
            try:
                kind, arg, stream = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if self._stop:
                    stream.put(EngineDead("the engine is shutting down"))
                    continue
                try:
                    engine.add_request(arg)
                except Exception as exc:  # this request's own error
                    stream.put(exc)
                else:
                    self._streams[arg.request_id] = stream
            elif kind == "abort":
                engine.abort(arg)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _close_streams(self) -> None:
        reason = (
            f"the engine step loop died: {self._dead}" if self._dead else "the engine shut down"
        )
        for stream in self._streams.values():
            stream.put(EngineDead(reason))
        self._streams.clear()
        while True:  # requests that never reached the engine
            try:
                kind, _, stream = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                stream.put(EngineDead(reason))
