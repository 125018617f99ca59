"""``BrokerLimiter``: a gateway worker's limiter when its supervisor hosts the limits broker
(``gateway.limits_broker``): the in-process limiter's semantics, exact across workers.

One ZeroMQ DEALER socket per worker process, driven by its event loop; each call waits
for its ``Reply`` (a settle too, so a request that ends on one worker frees its slot
before the client hears back and sends the next, to whichever worker). A refused admit
comes back as the verdict: this worker counts it (``Metrics.limit_rejected``) and raises
the same ``RateLimited``/``QuotaExceeded`` the in-process limiter would.

A broker that is not there (the send fails at once: ``IMMEDIATE`` queues nothing for a
missing peer) or does not answer within ``timeout_s`` is an outage, handled like Redis
down (``gateway.limit_store``): rates fail open, budgets fail closed. An admit that timed
out may still have been granted: its release follows it, so no slot stays taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

import msgspec
import zmq
import zmq.asyncio

from loraplex.gateway.limit_store import Breaker, OutagePolicy, StoreDown
from loraplex.gateway.limits import (
    Admission,
    MonthUsage,
    new_admission_id,
    rejection,
    reserve_spend,
    scopes_for,
)
from loraplex.gateway.limits_wire import (
    Admit,
    Call,
    Reply,
    Settle,
    SyncMonth,
    encoder,
    reply_decoder,
)
from loraplex.gateway.metrics import Metrics
from loraplex.tenancy.principal import Principal

log = logging.getLogger("loraplex.limits")
_CONNECT_GRACE_S = 0.2  # the most a call waits for the broker's connection to come up


class Unanswered(StoreDown):
    """The call went out but no answer came in time (the broker may have applied it)."""


class BrokerLimiter:
    def __init__(
        self,
        address: str,
        metrics: Metrics,
        *,
        rates_fail_open: bool = True,
        budgets_fail_open: bool = False,
        timeout_s: float = 1.0,
        retry_s: float = 1.0,
    ) -> None:
        self.address = address
        self._metrics = metrics
        self._policy = OutagePolicy(rates_fail_open, budgets_fail_open)
        self._breaker = Breaker("limits broker", retry_s=retry_s)
        self._timeout_s = timeout_s
        self._enc = encoder()
        self._dec = reply_decoder()
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[Reply]] = {}
        self._receiver: asyncio.Task[None] | None = None
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no peer: a send fails now, not after a timeout
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.connect(address)  # now, so the connection is up before the first request
        self._sock = sock

    async def admit(
        self, principal: Principal, reserve_tokens: int, *, prompt_tokens: int | None = None
    ) -> Admission:
        rid = new_admission_id()
        call = Admit(next(self._ids), rid, principal, reserve_tokens, prompt_tokens)
        try:
            reply = await self._call(call)
        except StoreDown as exc:
            scopes = scopes_for(principal)
            spend = reserve_spend(principal, reserve_tokens, prompt_tokens)
            if isinstance(exc, Unanswered):  # release what the broker may yet grant
                await self._send_nowait(Settle(0, Admission(rid, scopes, reserve_tokens, spend), 0))
            return self._policy.degraded(self._metrics, scopes, rid, reserve_tokens, spend)
        if reply.admission is not None:
            return reply.admission
        if reply.verdict is None:
            raise RuntimeError("the limits broker answered an admit without a verdict")
        for v in reply.verdict.violations:
            self._metrics.limit_rejected(v.kind.value, v.scope, principal.tenant_name)
        raise rejection(reply.verdict, reserve_tokens)

    async def settle(
        self, admission: Admission, used_tokens: int, *, cost_micros: int | None = None
    ) -> None:
        if admission.settled:
            return
        admission.settled = True
        if admission.degraded:
            return
        try:
            await self._call(Settle(next(self._ids), admission, used_tokens, cost_micros))
        except StoreDown as exc:
            # The ledger still bills it; the broker's budget counter misses this request
            # until the next budget sync (and its slot frees itself when the lease ends).
            self._metrics.limiter_settle_errors.inc()
            log.debug("settle of %s lost (%s); its lease will expire", admission.id, exc)

    async def sync_month(self, usage: list[MonthUsage]) -> None:
        await self._call(SyncMonth(next(self._ids), usage), timeout_s=max(self._timeout_s, 10.0))

    async def aclose(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._receiver
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(StoreDown("the limiter is closing"))
        self._calls.clear()
        self._ctx.destroy(linger=0)

    # -- the wire ------------------------------------------------------------------------

    async def _call(self, call: Admit | Settle | SyncMonth, timeout_s: float = 0.0) -> Reply:
        self._breaker.check()
        if self._receiver is None:
            self._receiver = asyncio.create_task(self._receive(), name="limits-broker-receive")
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._calls[call.call_id] = fut
        try:
            if not await self._send(self._enc.encode(call)):
                exc: StoreDown = StoreDown(f"the limits broker at {self.address} is not connected")
                self._breaker.failed(exc)
                raise exc
            limit = timeout_s or self._timeout_s
            try:
                async with asyncio.timeout(limit):
                    reply = await fut
            except TimeoutError:
                exc = Unanswered(f"the limits broker did not answer in {limit}s")
                self._breaker.failed(exc)
                raise exc from None
        finally:
            self._calls.pop(call.call_id, None)
        self._breaker.succeeded()
        if reply.error:
            raise StoreDown(f"the limits broker failed: {reply.error}")
        return reply

    async def _send(self, data: bytes) -> bool:
        """False when no broker is connected, after a short grace for a (re)connection
        under way (a worker's first request may come before the socket has connected)."""
        deadline = time.monotonic() + _CONNECT_GRACE_S
        while True:
            try:
                # The asyncio socket's own send: one through a blocking shadow of it could
                # swallow the edge-triggered wake-up of the receiving task.
                await self._sock.send(data, zmq.NOBLOCK)
                return True
            except zmq.Again:
                if time.monotonic() >= deadline:
                    return False
            await asyncio.sleep(0.005)

    async def _send_nowait(self, call: Call) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await self._sock.send(self._enc.encode(call), zmq.NOBLOCK)

    async def _receive(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                reply = self._dec.decode(data)
            except msgspec.DecodeError:
                log.warning("undecodable message from the limits broker")
                continue
            fut = self._calls.pop(reply.call_id, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)
