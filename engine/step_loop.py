"""The step loop: one thread that owns the :class:`LLMEngine` and runs it.

Clients hand it commands (add, abort, a call on the engine) through a queue; it hands back
each step's outputs as ONE list through ``emit`` (the in-process client schedules one call
on its event loop per step; the engine server queues one message per gateway). A request's
own failure (a bad value, an overloaded engine) comes back as a finished output with its
error. If the loop itself dies, ``failure`` says why and ``on_dead`` is called.

An owner that reads the clients' messages itself (the engine server) may give ``io``: the
loop then waits through it when idle, so that a message that comes then is read by this
thread, which runs what it asks for at once, instead of by another thread that would wake
this one (``StepIO``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from loraplex.engine.api import EngineOutput, Request
from loraplex.engine.errors import EngineDead, as_engine_error
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.stats import EngineStats
from loraplex.heap import freeze_heap

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # nothing to do: how long to sleep before looking again
_LOADING_WAIT_S = 0.02  # only waiting on adapter loads
_STATS_EVERY_S = 0.05  # the stats snapshot is refreshed at most this often while busy

Emit = Callable[[list[EngineOutput]], None]
CallDone = Callable[[Any, BaseException | None], None]


class StepIO(Protocol):
    """The owner's sockets, as the step thread sees them (called on the step thread, but
    ``poke``)."""

    def poll(self) -> None:
        """Each turn: read what has come, if this thread holds the sockets now."""

    def wait(self, timeout: float, woken: threading.Event) -> None:
        """Nothing to run: return when a message or a command (``woken``) comes, or after
        ``timeout``."""

    def busy(self) -> None:
        """A step is about to run."""

    def release(self) -> None:
        """The loop is over: the sockets go back to their owner."""

    def poke(self) -> None:
        """Another thread queued a command: a ``wait`` in progress returns."""


def failed(request_id: str, exc: BaseException) -> EngineOutput:
    return EngineOutput(request_id, [], 0, 0, True, as_engine_error(exc).to_info())


class StepLoop:
    def __init__(
        self,
        factory: Callable[[], LLMEngine],
        emit: Emit,
        *,
        on_ready: Callable[[LLMEngine], None] | None = None,
        on_dead: Callable[[BaseException], None] | None = None,
        freeze: bool = False,
        io: StepIO | None = None,
    ) -> None:
        """``freeze``: :func:`loraplex.heap.freeze_heap` once the engine is ready (a process
        of its own: the engine server). ``io``: see the module's doc."""
        self._factory = factory
        self._freeze = freeze
        self._emit = emit
        self._on_ready = on_ready
        self._on_dead = on_dead
        self._commands: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._io = io
        self._ready = threading.Event()
        self._stop = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()
        self._stats_at = 0.0
        # True while ``emit`` runs with a step's outputs after which the loop has nothing
        # left to run (it waits for work next): an emitter may then spend this thread's time
        self.going_idle = False
        self.engine: LLMEngine | None = None  # for tests and tools; the step thread's own

    # -- lifecycle (any thread) -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._signal()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self._dead is None and not self._stop

    @property
    def failure(self) -> BaseException | None:
        return self._dead

    @property
    def stopping(self) -> bool:
        return self._stop

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.is_ready

    def stats(self) -> EngineStats:
        return self._stats

    # -- commands (any thread) -----------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue ``request``; its time in the engine (queue time, first token) counts from
        here, the wait for the step in flight to end included."""
        self._put("add", request, time.perf_counter())

    def abort(self, request_ids: list[str]) -> None:
        self._put("abort", request_ids, None)

    def call(self, fn: Callable[[LLMEngine], Any], done: CallDone) -> None:
        """Run ``fn(engine)`` on the step thread; ``done(result, error)`` there after."""
        self._put("call", fn, done)

    def _put(self, kind: str, arg: Any, extra: Any) -> None:
        self._commands.put((kind, arg, extra))
        self._signal()

    def _signal(self) -> None:
        self._wake.set()
        if self._io is not None and threading.current_thread() is not self._thread:
            self._io.poke()

    def nudge(self) -> None:
        """Wake the loop (its ``io`` has changed hands)."""
        self._wake.set()

    # -- the step thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine = engine = self._factory()
            engine.loader.on_done = self._signal
            engine.grammars.on_done = self._signal
            self._stats = engine.stats()
            if self._freeze:  # before the engine says it is ready: the collection holds the
                freeze_heap()  # GIL (seconds on a loaded machine), so no ping goes unanswered
            if self._on_ready is not None:  # by a client that already counts on it
                self._on_ready(engine)
            self._ready.set()
            self._loop(engine)
        except BaseException as exc:
            if self._ready.is_set():
                log.exception("engine step loop died")
            else:  # the model did not load: the caller reports it (one line, no traceback)
                log.debug("the engine could not start", exc_info=exc)
            self._dead = exc
        finally:
            self._ready.set()
            try:
                self._finish()
            finally:
                if self._io is not None:
                    self._io.release()

    def _loop(self, engine: LLMEngine) -> None:
        idle_stats = False  # the stats snapshot is of the engine with nothing to do
        io = self._io
        while not self._stop:
            self._wake.clear()
            if io is not None:
                io.poll()
            self._drain(engine)
            if not engine.has_unfinished():
                engine.check_runner()  # a dead part of the runner ends an idle engine too
                if engine.loader.has_finished():  # loads asked for without a request
                    engine.collect_loads()
                    idle_stats = False
                if not idle_stats:
                    self._stats, idle_stats = engine.stats(), True
                if io is not None:
                    io.wait(_IDLE_WAIT_S, self._wake)
                else:
                    self._wake.wait(_IDLE_WAIT_S)
                continue
            idle_stats = False
            if io is not None:
                io.busy()
            outputs = engine.step()
            now = time.monotonic()
            if not engine.has_unfinished():
                # Going idle: the bookkeeping first, so that after these outputs go out
                # this thread waits at once (whoever sends them needs the GIL now).
                self._stats, self._stats_at, idle_stats = engine.stats(), now, True
            elif now - self._stats_at >= _STATS_EVERY_S:
                self._stats, self._stats_at = engine.stats(), now
            if outputs:
                self.going_idle = idle_stats
                try:
                    self._emit(outputs)
                finally:
                    self.going_idle = False
            if not engine.last_step_ran:  # only waiting on adapter loads
                if io is not None:
                    io.wait(_LOADING_WAIT_S, self._wake)
                else:
                    self._wake.wait(_LOADING_WAIT_S)

    def _drain(self, engine: LLMEngine) -> None:
        failures: list[EngineOutput] = []
        commands = self._commands
        while not commands.empty():  # (get_nowait's Empty costs ~8 us on every turn)
            try:
                kind, arg, extra = commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                try:
                    if self._stop:
                        raise EngineDead("the engine is shutting down")
                    engine.add_request(arg, received=extra)
                except Exception as exc:  # this request's own error
                    failures.append(failed(arg.request_id, exc))
            elif kind == "abort":
                for request_id in arg:
                    engine.abort(request_id)
            elif kind == "call":
                try:
                    result = arg(engine)
                except Exception as exc:
                    extra(None, exc)
                else:
                    extra(result, None)
        if failures:
            self._emit(failures)

    def _finish(self) -> None:
        """Stopped or dead: every request in flight and queued ends, then the engine."""
        engine = self.engine
        reason = EngineDead(
            f"the engine step loop died: {self._dead}" if self._dead else "the engine shut down"
        )
        outputs: list[EngineOutput] = []
        if engine is not None:
            try:
                outputs += engine.abort_all()  # streams end with "abort"
            except Exception:
                log.exception("aborting requests at shutdown failed")
        while True:  # commands that never reached the engine
            try:
                kind, arg, extra = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                outputs.append(failed(arg.request_id, reason))
            elif kind == "call":
                extra(None, reason)
        if self._dead is not None:  # what the engine held died with it
            outputs = [failed(o.request_id, reason) if not o.error else o for o in outputs]
        try:
            if outputs:
                self._emit(outputs)
        finally:
            if engine is not None:
                engine.shutdown()
            if self._dead is not None and self._on_dead is not None:
                self._on_dead(self._dead)
