"""The remote :class:`engine.client.EngineClient`: an engine server in another process.

One connection per gateway process (``engine.transport``: framed messages over a Unix or
TCP socket), driven by this process's event loop: each read hands every ``Outputs``
message (one step) to the streams in one call, applies ``Status``/``Info``, resolves
``Reply``s (no future or task per message); a heartbeat task pings, and a connector task
(re)connects, 0.1 s to 1 s apart, saying hello on each connection. The engine is *ready*
once its ``Info`` has come and a status says so; *unreachable* when its connection drops
or it stops answering pings for ``timeout_s``; in-flight streams then end with
``EngineDead`` (their requests' usage is metered by the gateway as usual). When an engine
comes back (a restart: a new ``engine_id``), the client says hello again and serves on.
No torch here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import AsyncGenerator
from typing import Any, cast

import msgspec

from loraplex.engine.api import AdapterRef, AdapterResidency, Request, RequestOutput
from loraplex.engine.client import EngineHealth, ModelInfo
from loraplex.engine.client_streams import ClientStreams
from loraplex.engine.errors import EngineDead, error_from_info
from loraplex.engine.stats import EngineStats
from loraplex.engine.tokenizer_files import load_tokenizer
from loraplex.engine.transport import FrameError, FrameReader, frame, parse_address
from loraplex.engine.wire import (
    Abort,
    Add,
    Call,
    CallOp,
    Hello,
    Info,
    Outputs,
    Ping,
    Refused,
    Reply,
    Status,
    client_decoder,
    encoder,
)

log = logging.getLogger("loraplex.engine.client")
_RECONNECT_S = (0.1, 1.0)  # the wait before connecting again: first, at most
_CONNECT_TIMEOUT_S = 5.0


class _Connection(asyncio.Protocol):
    def __init__(self, client: RemoteEngineClient) -> None:
        self._client = client
        self._reader = FrameReader()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not subclasses of asyncio's, though they are the same)
        self._transport = cast(asyncio.Transport, transport)
        self._client._connected(self._transport)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            log.warning("the engine sent a bad frame (%s): reconnecting", exc)
            if self._transport is not None:
                self._transport.close()
            return
        handle = self._client._handle
        for payload in frames:
            handle(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._disconnected(self._transport)


class RemoteEngineClient:
    def __init__(
        self,
        address: str,
        *,
        token: str = "",
        heartbeat_s: float = 0.5,
        timeout_s: float = 10.0,  # silent this long: gone (a dead process drops at once)
        call_timeout_s: float = 30.0,
    ) -> None:
        self.address = address
        self._token = token
        self._heartbeat_s = heartbeat_s
        self._timeout_s = timeout_s
        self._call_timeout_s = call_timeout_s
        self._streams = ClientStreams()
        self._enc = encoder()
        self._dec = client_decoder()
        self._health = EngineHealth("unreachable", f"connecting to the engine at {address}")
        self._info: ModelInfo | None = None
        self._loading_info: str | None = None  # the engine id whose Info is being applied
        self._engine_id: str | None = None
        self._stats: EngineStats | None = None
        self._metrics = b""
        self._last_heard = 0.0
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._transport: asyncio.Transport | None = None
        self._dropped: asyncio.Event | None = None  # set when the connection closes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backlog: list[bytes | memoryview] | None = None  # held while an Info is applied
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        parse_address(self.address)  # a malformed address fails here, not in the connector
        self._loop = asyncio.get_running_loop()
        self._tasks = [
            asyncio.create_task(self._connector(), name="engine-connector"),
            asyncio.create_task(self._heartbeat(), name="engine-heartbeat"),
        ]

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._streams.fail_all(EngineDead("the gateway is shutting down"))
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def _connector(self) -> None:
        loop = asyncio.get_running_loop()
        family, where = parse_address(self.address)
        wait = _RECONNECT_S[0]
        while True:
            dropped = self._dropped = asyncio.Event()
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT_S):  # (a host that drops SYNs)
                    if family == socket.AF_UNIX:
                        await loop.create_unix_connection(lambda: _Connection(self), where)
                    else:
                        await loop.create_connection(lambda: _Connection(self), *where)
            except (OSError, TimeoutError) as exc:
                log.debug("connecting to the engine at %s: %s", self.address, exc)
                await asyncio.sleep(wait)
                wait = min(wait * 2, _RECONNECT_S[1])
                continue
            wait = _RECONNECT_S[0]
            await dropped.wait()
            await asyncio.sleep(wait)

    def _connected(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._hello()

    def _disconnected(self, transport: asyncio.Transport | None) -> None:
        if transport is not self._transport:
            return
        self._transport = None
        if self._dropped is not None:
            self._dropped.set()
        if self._closing:
            return
        # Every message the engine sent before it hung up has been applied by now (its
        # final outputs included): the streams still open will get nothing more.
        self._set_health(EngineHealth("unreachable", "the engine is not connected"))
        self._lost("the connection to the engine dropped")

    # -- sending -------------------------------------------------------------------------------

    def _send(self, msg: Any) -> None:
        """Send now or fail now."""
        transport = self._transport
        if transport is None or transport.is_closing():
            if self._loop is None:
                raise EngineDead("the engine client is not started")
            raise EngineDead("the engine is not reachable")
        transport.write(frame(self._enc, msg))

    def _send_add(self, request: Request) -> None:
        self._send(Add(request))

    def _send_abort(self, request_id: str) -> None:
        with contextlib.suppress(EngineDead):
            self._send(Abort([request_id]))

    # -- receiving -----------------------------------------------------------------------------

    def _handle(self, data: bytes | memoryview) -> None:
        if self._backlog is not None:  # an Info is being applied: messages keep their order
            self._backlog.append(data)
            return
        self._last_heard = time.monotonic()
        try:
            msg = self._dec.decode(data)
        except msgspec.DecodeError:
            log.warning("undecodable message from the engine")
            return
        try:
            if isinstance(msg, Info):
                self._backlog = []
                task = asyncio.create_task(self._apply_info(msg.info), name="engine-info")
                self._tasks.append(task)
            else:
                self._apply(msg)
        except Exception:
            log.exception("applying an engine message failed")

    async def _apply_info(self, info: ModelInfo) -> None:
        try:
            await self._on_info(info)
        except Exception:
            log.exception("applying an engine message failed")
        finally:
            backlog, self._backlog = self._backlog or [], None
            for data in backlog:
                self._handle(data)

    def _apply(self, msg: Any) -> None:
        if isinstance(msg, Outputs):
            aborts = self._streams.deliver(msg.outputs)
            if aborts:
                with contextlib.suppress(EngineDead):
                    self._send(Abort(aborts))
        elif isinstance(msg, Status):
            self._on_status(msg)
        elif isinstance(msg, Reply):
            fut = self._calls.pop(msg.call_id, None)
            if fut is not None and not fut.done():
                if msg.error is not None:
                    fut.set_exception(error_from_info(msg.error))
                else:
                    fut.set_result(msg.result)
        elif isinstance(msg, Refused):
            detail = f"the engine refused this gateway: {msg.detail}"
            self._lost(detail)
            self._set_health(EngineHealth("unreachable", detail))
            if "hello" in msg.detail:
                self._hello()

    def _on_status(self, msg: Status) -> None:
        if self._engine_id is not None and msg.engine_id and msg.engine_id != self._engine_id:
            self._lost("the engine restarted")  # what ran on the old one is gone
            self._hello()
        if msg.engine_id:
            self._engine_id = msg.engine_id
        if msg.stats is not None:
            self._stats = msg.stats
        if msg.metrics:
            self._metrics = msg.metrics
        if msg.state == "ready":
            if self._info is not None and self._info.engine_id == msg.engine_id:
                self._set_health(EngineHealth("ready"))
        elif msg.state == "dead":  # its supervisor restarts it: unreachable, not dead, here
            with contextlib.suppress(EngineDead):
                self._send(Ping())  # read to here: the engine may close now
            self._lost(msg.detail)
            self._set_health(EngineHealth("unreachable", msg.detail))
        else:
            self._set_health(EngineHealth(msg.state, msg.detail))

    async def _on_info(self, info: ModelInfo) -> None:
        if self._info is not None and self._info.engine_id == info.engine_id:
            return
        if self._loading_info == info.engine_id:
            return
        self._loading_info = info.engine_id
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, info.tokenizer_files)
        finally:
            self._loading_info = None
        self._streams.set_tokenizer(tokenizer, info.vocab_size)
        self._info = info
        self._engine_id = info.engine_id
        self._set_health(EngineHealth("ready"))

    def _lost(self, detail: str) -> None:
        """The engine went away: every stream in flight ends, calls fail."""
        dead = EngineDead(detail or "the engine went away")
        self._streams.fail_all(dead)
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(dead)
        self._calls.clear()
        if self._health.state == "ready":
            self._set_health(EngineHealth("unreachable", dead.message))

    def _set_health(self, health: EngineHealth) -> None:
        if health != self._health:
            if health.state != self._health.state:
                log.info("engine %s: %s %s", self.address, health.state, health.detail)
            self._health = health

    def _hello(self) -> None:
        with contextlib.suppress(EngineDead):
            self._send(Hello(self._token))

    async def _heartbeat(self) -> None:
        while True:
            if self._engine_id is None or self._info is None:
                self._hello()
            else:
                with contextlib.suppress(EngineDead):
                    self._send(Ping())
            await asyncio.sleep(self._heartbeat_s)
            silent = time.monotonic() - self._last_heard
            if self._health.state == "ready" and silent > self._timeout_s:
                self._lost(f"the engine did not answer for {silent:.1f}s")

    # -- the protocol --------------------------------------------------------------------

    def health(self) -> EngineHealth:
        return self._health

    def model_info(self) -> ModelInfo | None:
        return self._info if self._health.ready else None

    def tokenizer(self) -> Any:
        return self._streams.tokenizer

    def stats(self) -> EngineStats | None:
        return self._stats

    def metrics_text(self) -> bytes:
        return self._metrics

    def _check_ready(self) -> None:
        if not self._health.ready:
            raise EngineDead(self._health.detail or "the engine is not ready")

    def generate(self, request: Request) -> AsyncGenerator[RequestOutput, None]:
        self._check_ready()
        return self._streams.stream(request, self._send_add, self._send_abort)

    async def abort(self, request_id: str) -> None:
        self._send_abort(request_id)

    async def _call(self, op: CallOp, ref: AdapterRef | None = None, key: str | None = None) -> Any:
        self._check_ready()
        call_id = next(self._call_ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        try:
            self._send(Call(call_id, op, ref, key))
            return await asyncio.wait_for(fut, self._call_timeout_s)
        except TimeoutError:
            raise EngineDead(f"the engine did not answer a {op} call in time") from None
        finally:
            self._calls.pop(call_id, None)

    async def adapter_residency(self) -> AdapterResidency:
        result: AdapterResidency = await self._call("residency")
        return result

    async def load_adapter(self, ref: AdapterRef) -> bool:
        return bool(await self._call("load", ref=ref))

    async def unload_adapter(self, key: str) -> bool:
        return bool(await self._call("unload", key=key))
