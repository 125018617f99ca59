"""The engine server: the step loop in a process of its own, serving gateway processes.

Two threads. The step thread (``engine.step_loop``) owns the engine. The sockets (the
listening one and one connection per gateway process, ``engine.transport``) are the main
thread's while the step loop is busy: it decodes gateway messages into step-loop commands,
and encodes each step's outputs, grouped by the gateway process that sent each request, as
one message per gateway. Encoding runs while the step thread waits on the GPU (torch
releases the GIL there), so a busy step loop never serializes a token itself. While the
step loop is idle, the main thread lends the sockets to the step thread, which then waits
on them itself: a request that comes to an idle engine is read, decoded and started by
the step thread, without another thread's wake-up and a GIL hand-over in between, and its
outputs are sent from there too. The step thread gives the sockets back once it has been
busy for ``_LEND_BUSY_S`` (``_StepSockets``).

On SIGTERM with a ``drain_grace_s`` the server drains: its status says ``draining`` (a
router sends new requests elsewhere), requests still sent are refused as overloaded (a
router retries them on another replica), and what runs gets ``drain_grace_s`` to finish
before the rest is aborted; a second SIGTERM stops at once.

A gateway whose connection closes, or that stops pinging for ``client_timeout_s``, has its
requests aborted. If the step loop dies the server tells every gateway, then exits non-zero
(its supervisor restarts it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from loraplex.engine.api import EngineOutput
from loraplex.engine.client import ModelInfo
from loraplex.engine.errors import EngineOverloaded, InvalidRequest, as_engine_error
from loraplex.engine.http_surface import EngineHttp
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model_info import describe
from loraplex.engine.step_loop import StepLoop, failed
from loraplex.engine.transport import FrameError, FrameReader, frame, listen, parse_address, tune
from loraplex.engine.wire import (
    Abort,
    Add,
    Call,
    Hello,
    Info,
    Outputs,
    Ping,
    Refused,
    Reply,
    Status,
    encoder,
    server_decoder,
)

log = logging.getLogger("loraplex.engine.server")

_POLL_MS = 100
_LEND_BUSY_S = 0.005  # the step thread, busy this long with the sockets lent, gives them back


@dataclass
class _Client:
    last_seen: float
    requests: set[str] = field(default_factory=set)


@dataclass
class _Conn:
    """One gateway process's connection."""

    sock: socket.socket
    ident: bytes
    reader: FrameReader = field(default_factory=FrameReader)
    pending: bytearray = field(default_factory=bytearray)  # not yet taken by the kernel


class EngineServer:
    def __init__(
        self,
        factory: Callable[[], LLMEngine],
        address: str,
        *,
        name: str = "",
        model: str = "",
        token: str = "",
        client_timeout_s: float = 10.0,
        parent_pid: int | None = None,
        metrics: Callable[[], bytes] | None = None,
        http: str | None = None,
        drain_grace_s: float = 0.0,
    ) -> None:
        """``metrics``: the engine side's Prometheus text, sent with each ping's answer.
        ``http``: ``host:port`` of the HTTP surface (``engine.http_surface``), or None."""
        self.address = address
        self._name, self._model, self._token = name, model, token
        self._client_timeout_s = client_timeout_s
        self._parent_pid = parent_pid
        self._metrics = metrics
        self._http_address = http
        self._drain_grace_s = drain_grace_s
        self._drain_until: float | None = None  # draining (SIGTERM) until then
        self._drain_told = False  # every gateway has been sent the draining status
        self._out: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        # Any thread wakes the main thread by writing a byte (the step thread, loader replies)
        self._wake_rx, self._wake_tx = socket.socketpair()
        self._wake_rx.setblocking(False)
        self._wake_tx.setblocking(False)
        # The connections are the main thread's, but for the step thread's last outputs
        # before it idles (``_emit``): every send and every change to them holds this lock.
        self._conns: dict[bytes, _Conn] = {}
        self._serving = False  # the step thread may send (under the lock) while True
        self._want_write: set[bytes] = set()  # connections with bytes the kernel refused
        self._io_lock = threading.Lock()
        # Which thread waits on the sockets ("main", or "step" while lent: _StepSockets);
        # changed under the lock, by the main thread to "step", by the step thread back.
        self._holder = "main"
        self._lend_asked = False
        self._main_turn = threading.Event()  # the sockets came back to the main thread
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._info: ModelInfo | None = None
        self._engine_id = ""
        self._clients: dict[bytes, _Client] = {}
        self._owner: dict[str, bytes] = {}
        self._stop = False
        self._exit_code: int | None = None
        self._step = StepLoop(
            factory,
            self._emit,
            on_ready=self._on_ready,
            on_dead=self._on_dead,
            freeze=True,
            io=_StepSockets(self),
        )
        self._enc = encoder()
        self._dec = server_decoder()

    # -- the step thread's side ---------------------------------------------------------------

    def _on_ready(self, engine: LLMEngine) -> None:
        engine.grammars.prepare()  # the first structured request need not wait for it
        self._info = describe(engine, name=self._name, model=self._model)
        self._engine_id = self._info.engine_id
        self._post(("ready",))

    def _on_dead(self, exc: BaseException) -> None:  # after the last outputs were emitted
        self._post(("dead", f"the engine step loop died: {exc}"))

    def _emit(self, outputs: list[EngineOutput]) -> None:
        self._out.put(("outputs", outputs))
        # The step loop goes idle after these (the last token of the last request): this
        # thread sends them itself, saving the main thread's wake-up on the way back.
        # While other requests run, the main thread encodes and sends as usual.
        # The same while the sockets are lent to this thread.
        if (self._step.going_idle or self._holder == "step") and self._flush_here():
            return
        self._wake_sockets()

    def _flush_here(self) -> bool:
        """Send what is queued from this thread, if the main thread is not using the
        connections now (then it will send it)."""
        if not self._serving or not self._io_lock.acquire(blocking=False):
            return False
        try:
            if not self._serving:
                return False
            self._flush()
            wake = bool(self._want_write) or self._exit_code is not None
        finally:
            self._io_lock.release()
        if wake:
            self._wake_sockets()
        return True

    def _post(self, item: tuple[Any, ...]) -> None:
        self._out.put(item)
        self._wake_sockets()

    def _wake_sockets(self) -> None:
        """The thread waiting on the sockets returns from its wait."""
        try:
            self._wake_tx.send(b"\0")
        except (BlockingIOError, OSError):  # wake-ups are pending already (or closing)
            pass

    # -- the main thread -----------------------------------------------------------------

    def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or the step loop dies (exit 1)."""
        listener = listen(self.address)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._request_stop())
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        sel.register(self._wake_rx, selectors.EVENT_READ)
        self._sel, self._listener = sel, listener
        self._serving = True
        self._step.start()
        http = None
        if self._http_address:
            http = EngineHttp(
                self._step,
                self._http_address,
                model_name=lambda: self._name or self._model,
                metrics=self._metrics,
                draining=lambda: self._stop or self._drain_until is not None,
            )
            http.start()
        log.info("engine server listening on %s", self.address)
        last_check = time.monotonic()
        lock = self._io_lock
        try:
            while not self._stop and self._exit_code is None:
                if self._holder == "step":  # lent to the step thread until it is busy
                    self._main_turn.wait(_POLL_MS / 1000)
                    self._main_turn.clear()
                    if self._want_write:  # bytes this thread queued: watched over there
                        self._wake_sockets()
                else:
                    events = sel.select(_POLL_MS / 1000)
                    lend = False
                    with lock:
                        self._serve(events)
                        if self._lend_asked and self._serving:
                            self._lend_asked, self._holder, lend = False, "step", True
                    if lend:
                        self._step.nudge()
                now = time.monotonic()
                if self._drain_until is not None and not self._drain_told:
                    # told now, not at each gateway's next heartbeat: a drain shorter than the
                    # heartbeat would otherwise end before any gateway knew it had begun
                    self._drain_told = True
                    with lock:
                        self._broadcast(self._status())
                if self._drain_until is not None and (not self._owner or now > self._drain_until):
                    self._stop = True
                if now - last_check >= 1.0:
                    last_check = now
                    with lock:  # the step thread's last outputs read the owners too
                        self._check_clients(now)
                    self._check_parent()
            if self._exit_code is None:
                self._step.shutdown()  # (the sockets come back as its loop ends)
                with lock:
                    self._serving = False  # the main thread's alone from here
                    self._flush()  # the aborted requests' last outputs
                self._broadcast(Status(self._engine_id, "dead", "the engine shut down"))
                self._exit_code = 0
            with lock:
                self._serving = False
            self._await_goodbyes(sel)
            return self._exit_code
        finally:
            if http is not None:
                http.close()
            for conn in self._conns.values():
                conn.sock.close()
            self._conns.clear()
            sel.close()
            listener.close()
            family, where = parse_address(self.address)
            if family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    os.unlink(where)
            self._wake_rx.close()
            self._wake_tx.close()

    def _await_goodbyes(self, sel: selectors.BaseSelector, timeout_s: float = 1.0) -> None:
        """Each gateway answers our last status (or hangs up): its last messages are then
        read, and what we sent is written out, before the sockets close."""
        for other in [k.fileobj for k in sel.get_map().values() if k.data is None]:
            sel.unregister(other)  # the listener and the wake-ups: nothing more is taken
        waiting = {i for i in self._clients if i in self._conns}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (
            waiting or any(c.pending for c in self._conns.values())
        ):
            self._watch_writes(sel)
            for key, mask in sel.select(0.05):
                conn = key.data
                if mask & selectors.EVENT_WRITE:
                    self._write(sel, conn)
                if mask & selectors.EVENT_READ:
                    try:
                        data = conn.sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    waiting.discard(conn.ident)
                    if not data:
                        self._close(sel, conn)

    def _request_stop(self) -> None:
        if self._drain_grace_s > 0 and self._drain_until is None:
            self._drain_until = time.monotonic() + self._drain_grace_s
            log.info("draining: %d requests get %.0fs to finish", len(self._owner),
                     self._drain_grace_s)  # fmt: skip
        else:
            self._stop = True

    def _drain_wakes(self) -> None:
        while True:
            try:
                if not self._wake_rx.recv(4096):
                    return
            except (BlockingIOError, OSError):
                return

    def _check_parent(self) -> None:
        if self._parent_pid is not None and os.getppid() != self._parent_pid:
            log.warning("the supervisor (pid %d) is gone; shutting down", self._parent_pid)
            self._stop = True

    def _check_clients(self, now: float) -> None:
        gone = [i for i, c in self._clients.items() if now - c.last_seen > self._client_timeout_s]
        for ident in gone:
            self._forget(ident, "went silent")

    def _forget(self, ident: bytes, why: str) -> None:
        """A gateway is gone: its requests are aborted (their outputs have no reader)."""
        client = self._clients.pop(ident, None)
        if client is None:
            return
        if client.requests:
            log.warning("gateway %s %s: aborting %d requests", ident.hex()[:8], why,
                        len(client.requests))  # fmt: skip
            self._step.abort(sorted(client.requests))
        for rid in client.requests:
            self._owner.pop(rid, None)

    # -- connections (main thread, under the lock) ----------------------------------------

    def _accept(self, sel: selectors.BaseSelector, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, a connection reset while queued
                log.warning("accepting a gateway's connection failed: %s", exc)
                return
            tune(sock)
            conn = _Conn(sock, os.urandom(8))
            self._conns[conn.ident] = conn
            sel.register(sock, selectors.EVENT_READ, conn)

    def _serve(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        """What the sockets' wait returned; then what is queued to send."""
        sel, listener = self._sel, self._listener
        assert sel is not None and listener is not None
        for key, mask in events:
            if key.fileobj is listener:
                self._accept(sel, listener)
            elif key.fileobj is self._wake_rx:
                self._drain_wakes()
            else:
                self._io(sel, key.data, mask)
        self._flush()
        self._watch_writes(sel)

    def _io(self, sel: selectors.BaseSelector, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._write(sel, conn)
        if not mask & selectors.EVENT_READ or conn.ident not in self._conns:
            return
        try:
            data = conn.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(sel, conn)
            self._forget(conn.ident, "disconnected")
            return
        try:
            frames = conn.reader.feed(data)
        except FrameError as exc:
            log.warning("gateway %s sent a bad frame (%s): closing", conn.ident.hex()[:8], exc)
            self._close(sel, conn)
            self._forget(conn.ident, "sent a bad frame")
            return
        for payload in frames:
            try:
                msg = self._dec.decode(payload)
            except msgspec.DecodeError:
                log.warning("undecodable message from %s", conn.ident.hex()[:8])
                continue
            self._handle(conn.ident, msg)

    def _close(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        if self._conns.pop(conn.ident, None) is None:
            return
        self._want_write.discard(conn.ident)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn.sock)
        conn.sock.close()

    def _write(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        if conn.pending:
            try:
                n = conn.sock.send(conn.pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # its reader sees the EOF and drops it
                conn.pending.clear()
                n = 0
            del conn.pending[:n]
        if not conn.pending and conn.ident in self._conns:
            with contextlib.suppress(KeyError, ValueError):
                sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _watch_writes(self, sel: selectors.BaseSelector) -> None:
        """Connections the kernel refused bytes for are watched until they take them."""
        for ident in self._want_write:
            conn = self._conns.get(ident)
            if conn is not None and conn.pending:
                with contextlib.suppress(KeyError, ValueError):
                    sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        self._want_write.clear()

    # -- incoming --------------------------------------------------------------------------

    def _handle(self, ident: bytes, msg: Any) -> None:
        client = self._clients.get(ident)
        if isinstance(msg, Hello):
            if self._token and msg.token != self._token:
                self._send(ident, Refused("wrong or missing engine token"))
                return
            # a gateway says hello every heartbeat until the model is loaded: that is hearing
            # from it (a load longer than the timeout forgot every gateway, which then
            # heard "say hello first" for its first ping once the engine was ready)
            now = time.monotonic()
            client = self._clients[ident] = self._clients.get(ident) or _Client(now)
            client.last_seen = now
            self._send(ident, self._status())
            if self._info is not None:
                self._send(ident, Info(self._info))
            return
        if client is None:  # no Hello yet (or timed out): ask it to say hello
            self._send(ident, Refused("say hello first"))
            return
        client.last_seen = time.monotonic()
        if isinstance(msg, Add):
            rid = msg.request.request_id
            if self._drain_until is not None:
                out = failed(rid, EngineOverloaded("the engine is shutting down"))
                self._out.put(("direct", ident, Outputs([out])))
                return
            if rid in self._owner:
                self._queue_failed(ident, rid, f"request id {rid!r} is already in use")
                return
            self._owner[rid] = ident
            client.requests.add(rid)
            self._step.add(msg.request)
        elif isinstance(msg, Abort):
            self._step.abort(msg.request_ids)
        elif isinstance(msg, Ping):
            status = self._status()
            if self._metrics is not None and status.state == "ready":
                status.metrics = self._metrics()
            self._send(ident, status)
        elif isinstance(msg, Call):
            self._call(ident, msg)

    def _queue_failed(self, ident: bytes, rid: str, message: str) -> None:
        out = failed(rid, InvalidRequest(message, param="request_id"))
        self._out.put(("direct", ident, Outputs([out])))

    def _call(self, ident: bytes, msg: Call) -> None:
        def run(engine: LLMEngine) -> Any:
            if msg.op == "residency":
                return engine.adapter_residency()
            if msg.op == "load" and msg.ref is not None:
                return engine.load_adapter(msg.ref)
            if msg.op == "unload" and msg.key is not None:
                return engine.unload_adapter(msg.key)
            raise ValueError(f"bad call {msg.op!r}")

        def done(result: Any, error: BaseException | None) -> None:
            info = None if error is None else as_engine_error(error).to_info()
            self._post(("direct", ident, Reply(msg.call_id, result, info)))

        self._step.call(run, done)

    # -- outgoing --------------------------------------------------------------------------

    def _status(self) -> Status:
        failure = self._step.failure
        if failure is not None:
            return Status(self._engine_id, "dead", f"the engine step loop died: {failure}")
        if not self._step.is_ready:
            return Status(self._engine_id, "starting", "the model is loading")
        if self._drain_until is not None:
            return Status(self._engine_id, "draining", "the engine is shutting down",
                          self._step.stats())  # fmt: skip
        return Status(self._engine_id, "ready", "", self._step.stats())

    def _send(self, ident: bytes, msg: Any) -> None:
        """Under the lock. What the kernel does not take now is kept and sent by the thread
        that waits on the sockets (never dropped: a slow gateway only delays its own
        outputs)."""
        conn = self._conns.get(ident)
        if conn is None:
            return  # that gateway is gone
        data = frame(self._enc, msg)
        if conn.pending:
            conn.pending += data
            return
        try:
            n = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:  # its reader sees the EOF and drops it
            log.debug("send to %s failed: %s", ident.hex()[:8], exc)
            return
        if n < len(data):
            conn.pending += memoryview(data)[n:]
            self._want_write.add(ident)

    def _broadcast(self, status: Status) -> None:
        for ident in list(self._clients):
            self._send(ident, status)

    def _flush(self) -> None:
        while not self._out.empty():  # (as in _receive: no queue.Empty raised every turn)
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return
            kind = item[0]
            if kind == "outputs":
                self._route(item[1])
            elif kind == "direct":
                self._send(item[1], item[2])
            elif kind == "dead":
                self._broadcast(Status(self._engine_id, "dead", item[1]))
                self._exit_code = 1
                return
            elif kind == "ready" and self._info is not None:
                info = Info(self._info)
                for ident in self._clients:
                    self._send(ident, self._status())
                    self._send(ident, info)

    def _route(self, outputs: list[EngineOutput]) -> None:
        by_client: dict[bytes, list[EngineOutput]] = {}
        owner = self._owner
        for out in outputs:
            ident = owner.get(out.request_id)
            if ident is None:
                continue  # its gateway is gone
            by_client.setdefault(ident, []).append(out)
            if out.finished:
                del owner[out.request_id]
                client = self._clients.get(ident)
                if client is not None:
                    client.requests.discard(out.request_id)
        for ident, outs in by_client.items():
            self._send(ident, Outputs(outs))


class _StepSockets:
    """The engine server's sockets as the step loop sees them (``step_loop.StepIO``): the
    step thread asks for them when it goes idle (the main thread lends them at its next
    turn), waits on them while idle, reads them between steps, and gives them back once
    it has been busy for ``_LEND_BUSY_S``, or when its loop ends."""

    def __init__(self, server: EngineServer) -> None:
        self._s = server
        self._busy_since: float | None = None  # the step loop has been busy since

    def poll(self) -> None:
        s = self._s
        if s._holder == "step" and s._sel is not None:
            events = s._sel.select(0)
            with s._io_lock:
                s._serve(events)

    def wait(self, timeout: float, woken: threading.Event) -> None:
        s = self._s
        self._busy_since = None
        if s._holder != "step" or s._sel is None:
            ask = False
            with s._io_lock:
                if s._serving and s._holder != "step" and not s._lend_asked:
                    s._lend_asked = ask = True
            if ask:
                s._wake_sockets()
            woken.wait(timeout)  # a command, or the sockets lent (``nudge``)
            return
        events = s._sel.select(0 if woken.is_set() else timeout)
        with s._io_lock:
            s._serve(events)

    def busy(self) -> None:
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since = now
        elif self._s._holder == "step" and now - self._busy_since >= _LEND_BUSY_S:
            self.release()

    def release(self) -> None:
        s = self._s
        if s._holder == "step":
            with s._io_lock:
                s._holder = "main"
            s._main_turn.set()

    def poke(self) -> None:
        if self._s._holder == "step":
            self._s._wake_sockets()
