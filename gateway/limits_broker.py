"""The limits broker: ONE ``InProcessLimiter`` for every gateway worker of a supervisor.

``loraplex serve`` / ``loraplex gateway`` without Redis run N gateway worker processes; each
building its own in-process limiter would admit N times a tenant's limits. The supervisor,
which outlives worker restarts, hosts this broker instead: a thread serving a ZeroMQ
ROUTER socket (``gateway.limits_wire``), applying each call to the one limiter in the order
it arrives, so every check stays atomic across the workers. The workers reach it through
``gateway.limiter_broker.BrokerLimiter``.

The broker counts no metrics (its registry is nobody's ``/metrics``): an admit's answer is
the verdict, and the worker that asked counts and raises the rejection. Its counters live
in the supervisor's memory, like the in-process limiter's: a restart of ``serve`` starts
the windows afresh, and the budget sync raises the month counters back from the ledger.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import suppress

import msgspec
import zmq
from prometheus_client import CollectorRegistry

from loraplex.gateway.limiter_memory import InProcessLimiter
from loraplex.gateway.limits_wire import (
    Admit,
    Call,
    Reply,
    Settle,
    SyncMonth,
    call_decoder,
    encoder,
)
from loraplex.gateway.metrics import Metrics

log = logging.getLogger("loraplex.limits")

_POLL_MS = 100  # how often the serving thread looks at its stop flag


class BrokerStartError(RuntimeError):
    """The broker cannot serve at its address."""


class BrokerAddressInUse(BrokerStartError):
    pass


class LimitsBroker:
    def __init__(self, address: str, *, lease_s: float = 600.0) -> None:
        self.address = address
        self._limiter = InProcessLimiter(Metrics(CollectorRegistry()), lease_s=lease_s)
        self._enc = encoder()
        self._dec = call_decoder()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="limits-broker", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        """Bind and serve in a thread; raises when the address cannot be bound."""
        _refuse_live_socket(self.address)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise BrokerStartError(f"the limits broker did not bind {self.address} in time")
        if self._error is not None:
            raise BrokerStartError(f"cannot bind {self.address}: {self._error}")
        log.info("limits broker serving on %s", self.address)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        try:
            sock.bind(self.address)
            inode = _make_private(self.address)
        except (zmq.ZMQError, OSError) as exc:
            self._error = exc
            sock.close(0)
            ctx.term()
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if sock.poll(_POLL_MS):
                    self._serve_ready(sock)
        finally:
            sock.close(0)
            ctx.term()
            _remove_socket_file(self.address, inode)

    def _serve_ready(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            ident, data = frames
            try:
                call = self._dec.decode(data)
            except msgspec.DecodeError:
                log.warning("undecodable message from gateway worker %s", ident.hex()[:8])
                continue
            reply = self._apply(call)
            if reply is None:
                continue
            with suppress(zmq.ZMQError):  # that worker is gone
                sock.send_multipart([ident, self._enc.encode(reply)], zmq.NOBLOCK)

    def _apply(self, call: Call) -> Reply | None:
        try:
            if isinstance(call, Admit):
                verdict, admission = self._limiter.decide(
                    call.principal, call.reserve_tokens, call.prompt_tokens, call.admission_id
                )
                return Reply(call.call_id, verdict, admission)
            if isinstance(call, Settle):
                self._limiter.settle_now(call.admission, call.used_tokens, call.cost_micros)
            elif isinstance(call, SyncMonth):
                self._limiter.raise_months(call.usage)
        except Exception as exc:  # a bug, not an outage: that worker's policy applies
            log.exception("limits broker failed to apply %s", type(call).__name__)
            return Reply(call.call_id, error=f"{type(exc).__name__}: {exc}")
        return Reply(call.call_id) if call.call_id else None


def _ipc_path(address: str) -> str | None:
    return address.removeprefix("ipc://") if address.startswith("ipc://") else None


def _refuse_live_socket(address: str) -> None:
    """ZeroMQ would take over an ipc path another live broker serves (and strand its
    workers); a file no one answers on is a leftover of a killed supervisor, and is reused."""
    path = _ipc_path(address)
    if path is None or not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return
    finally:
        probe.close()
    raise BrokerAddressInUse(
        f"{path}: another limits broker serves there (another `loraplex serve` with this "
        "data dir and port?)"
    )


def _make_private(address: str) -> int | None:
    """Only this user may connect: the broker trusts whoever does. Returns the socket
    file's inode (None: not an ipc address)."""
    path = _ipc_path(address)
    if path is None:
        return None
    os.chmod(path, 0o600)
    return os.stat(path).st_ino


def _remove_socket_file(address: str, inode: int | None) -> None:
    """ZeroMQ leaves the ipc socket file behind; remove it unless it is no longer ours."""
    path = _ipc_path(address)
    if path is None or inode is None:
        return
    with suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)
