"""The engine server: the step loop in a process of its own, serving gateway processes.

Two threads. The step thread (``engine.step_loop``) owns the engine. The main thread owns
the ZeroMQ ROUTER socket: it decodes gateway messages into step-loop commands, and encodes
each step's outputs, grouped by the gateway process that sent each request, as one message
per gateway. Encoding runs while the step thread waits on the GPU (torch releases the GIL
there), so the step loop never serializes a token itself.

On SIGTERM with a ``drain_grace_s`` the server drains: its status says ``draining`` (a
router sends new requests elsewhere), requests still sent are refused as overloaded (a
router retries them on another replica), and what runs gets ``drain_grace_s`` to finish
before the rest is aborted; a second SIGTERM stops at once.

A gateway that stops pinging for ``client_timeout_s`` has its requests aborted. If the step
loop dies the server tells every gateway, then exits non-zero (its supervisor restarts it).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from loraplex.engine.api import EngineOutput
from loraplex.engine.client import ModelInfo
from loraplex.engine.errors import EngineOverloaded, InvalidRequest, as_engine_error
from loraplex.engine.http_surface import EngineHttp
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model_info import describe
from loraplex.engine.step_loop import StepLoop, failed
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


@dataclass
class _Client:
    last_seen: float
    requests: set[str] = field(default_factory=set)


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
        self._ctx = zmq.Context()
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(f"inproc://wake-{id(self)}")
        self._wake_tx = self._ctx.socket(zmq.PAIR)  # the step thread's end
        self._wake_tx.connect(f"inproc://wake-{id(self)}")
        self._wake_lock = threading.Lock()  # several threads may wake (step, loader replies)
        # The ROUTER socket is the main thread's, but for the step thread's last outputs
        # before it idles (``_emit``): every use of it holds this lock, and the main thread
        # waits on its descriptor, not on the socket (a ZeroMQ socket is one thread's at a
        # time).
        self._router: zmq.Socket | None = None  # type: ignore[type-arg]
        self._router_lock = threading.Lock()
        self._info: ModelInfo | None = None
        self._engine_id = ""
        self._clients: dict[bytes, _Client] = {}
        self._owner: dict[str, bytes] = {}
        self._stop = False
        self._exit_code: int | None = None
        self._step = StepLoop(
            factory, self._emit, on_ready=self._on_ready, on_dead=self._on_dead, freeze=True
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
        if self._step.going_idle and self._flush_here():
            return
        self._wake_main()

    def _flush_here(self) -> bool:
        """Send what is queued from this thread, if the main thread is not using the
        socket now (then it will send it). ZeroMQ signals readiness on edges, and a send
        can take the edge of a message that came in: the main thread is woken for it."""
        router = self._router
        if router is None or not self._router_lock.acquire(blocking=False):
            return False
        try:
            self._flush(router)
            incoming = bool(router.getsockopt(zmq.EVENTS) & zmq.POLLIN)
        finally:
            self._router_lock.release()
        if incoming or self._exit_code is not None:
            self._wake_main()
        return True

    def _post(self, item: tuple[Any, ...]) -> None:
        self._out.put(item)
        self._wake_main()

    def _wake_main(self) -> None:
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.Again:  # a wake-up is pending already
                pass

    # -- the main thread -----------------------------------------------------------------

    def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or the step loop dies (exit 1)."""
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.SNDHWM, 0)  # never drop a step's outputs for a slow gateway
        router.setsockopt(zmq.RCVHWM, 0)
        router.setsockopt(zmq.LINGER, 2000)
        router.bind(self.address)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._request_stop())
        self._router = router
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
        poller = zmq.Poller()
        poller.register(router.getsockopt(zmq.FD), zmq.POLLIN)  # edge: EVENTS says what
        poller.register(self._wake_rx, zmq.POLLIN)
        log.info("engine server listening on %s", self.address)
        last_check = time.monotonic()
        lock = self._router_lock
        try:
            while not self._stop and self._exit_code is None:
                with lock:  # read to the end before waiting on the next edge
                    waiting = bool(router.getsockopt(zmq.EVENTS) & zmq.POLLIN)
                events = dict(poller.poll(0 if waiting else _POLL_MS))
                if self._wake_rx in events:
                    self._drain_wakes()
                with lock:
                    self._receive(router)
                    self._flush(router)
                now = time.monotonic()
                if self._drain_until is not None and not self._drain_told:
                    # told now, not at each gateway's next heartbeat: a drain shorter than the
                    # heartbeat would otherwise end before any gateway knew it had begun
                    self._drain_told = True
                    with lock:
                        self._broadcast(router, self._status())
                if self._drain_until is not None and (not self._owner or now > self._drain_until):
                    self._stop = True
                if now - last_check >= 1.0:
                    last_check = now
                    with lock:  # the step thread's last outputs read the owners too
                        self._check_clients(now)
                    self._check_parent()
            if self._exit_code is None:
                self._step.shutdown()
                with lock:
                    self._flush(router)  # the aborted requests' last outputs
                    self._router = None  # the main thread's alone from here
                self._broadcast(router, Status(self._engine_id, "dead", "the engine shut down"))
                self._exit_code = 0
            with lock:
                self._router = None
            self._await_goodbyes(router)
            return self._exit_code
        finally:
            if http is not None:
                http.close()
            router.close(linger=1000)
            self._wake_rx.close(0)
            self._wake_tx.close(0)
            self._ctx.term()

    def _await_goodbyes(self, router: zmq.Socket, timeout_s: float = 1.0) -> None:  # type: ignore[type-arg]
        """Each gateway answers our last status; closing before it has read our last
        messages could drop them (ZeroMQ discards what a peer left unread at disconnect)."""
        waiting = set(self._clients)
        deadline = time.monotonic() + timeout_s
        while waiting and time.monotonic() < deadline:
            if not router.poll(50):
                continue
            while True:
                try:
                    ident, _ = router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except ValueError:
                    continue
                waiting.discard(ident)

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
                self._wake_rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _check_parent(self) -> None:
        if self._parent_pid is not None and os.getppid() != self._parent_pid:
            log.warning("the supervisor (pid %d) is gone; shutting down", self._parent_pid)
            self._stop = True

    def _check_clients(self, now: float) -> None:
        gone = [i for i, c in self._clients.items() if now - c.last_seen > self._client_timeout_s]
        for ident in gone:
            client = self._clients.pop(ident)
            if client.requests:
                log.warning("gateway %s went silent: aborting %d requests", ident.hex()[:8],
                            len(client.requests))  # fmt: skip
                self._step.abort(sorted(client.requests))
            for rid in client.requests:
                self._owner.pop(rid, None)

    # -- incoming --------------------------------------------------------------------------

    def _receive(self, router: zmq.Socket) -> None:  # type: ignore[type-arg]
        # (asked first: a zmq.Again raised on every turn costs the step thread, waiting
        # for the GIL with a request just handed over, ~10 us)
        while router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                ident, data = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not [identity, payload]
                continue
            try:
                msg = self._dec.decode(data)
            except msgspec.DecodeError:
                log.warning("undecodable message from %s", ident.hex()[:8])
                continue
            self._handle(router, ident, msg)

    def _handle(self, router: zmq.Socket, ident: bytes, msg: Any) -> None:  # type: ignore[type-arg]
        client = self._clients.get(ident)
        if isinstance(msg, Hello):
            if self._token and msg.token != self._token:
                self._send(router, ident, Refused("wrong or missing engine token"))
                return
            client = self._clients[ident] = self._clients.get(ident) or _Client(time.monotonic())
            self._send(router, ident, self._status())
            if self._info is not None:
                self._send(router, ident, Info(self._info))
            return
        if client is None:  # no Hello yet (or timed out): ask it to say hello
            self._send(router, ident, Refused("say hello first"))
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
            self._send(router, ident, status)
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

    def _send(self, router: zmq.Socket, ident: bytes, msg: Any) -> None:  # type: ignore[type-arg]
        try:
            router.send_multipart([ident, self._enc.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # that gateway is gone (unroutable)
            log.debug("send to %s failed: %s", ident.hex()[:8], exc)

    def _broadcast(self, router: zmq.Socket, status: Status) -> None:  # type: ignore[type-arg]
        for ident in list(self._clients):
            self._send(router, ident, status)

    def _flush(self, router: zmq.Socket) -> None:  # type: ignore[type-arg]
        while not self._out.empty():  # (as in _receive: no queue.Empty raised every turn)
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return
            kind = item[0]
            if kind == "outputs":
                self._route(router, item[1])
            elif kind == "direct":
                self._send(router, item[1], item[2])
            elif kind == "dead":
                self._broadcast(router, Status(self._engine_id, "dead", item[1]))
                self._exit_code = 1
                return
            elif kind == "ready" and self._info is not None:
                info = Info(self._info)
                for ident in self._clients:
                    self._send(router, ident, self._status())
                    self._send(router, ident, info)

    def _route(self, router: zmq.Socket, outputs: list[EngineOutput]) -> None:  # type: ignore[type-arg]
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
            self._send(router, ident, Outputs(outs))
