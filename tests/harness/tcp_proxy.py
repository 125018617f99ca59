"""A TCP proxy that tests put between the code and a real server (PostgreSQL, Redis, S3)
to take the server away the ways networks fail:

- ``refuse()``: stop listening and reset every connection (connects are refused,
  connections in use are reset), like a server that is down;
- ``blackhole()``: keep accepting but never answer: bytes of new and open connections go
  nowhere, like a partition or a dropped-packets firewall (the client's own timeouts are
  all that end its wait);
- ``throttle(bytes_per_s)``: forward, slowly (a slow link);
- ``restore()``: forward again. Connections that lived through a black hole are reset
  (their bytes were lost: neither end could use them again).

``TcpProxy`` runs on the caller's event loop; ``ThreadedProxy`` runs one on a loop of its
own thread, for servers that run in other threads (uvicorn, moto) and for sync tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, Literal

from harness.services import free_port

Mode = Literal["forward", "refuse", "blackhole"]


class _Link:
    """One client connection and, unless it was black-holed from the start, its upstream."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.writers = [client]
        self.lost_bytes = False  # a black hole swallowed some: unusable once restored

    def abort(self) -> None:
        for w in self.writers:
            w.transport.abort()


class TcpProxy:
    """127.0.0.1:<port> -> upstream. Starts refusing: call ``restore()`` to forward."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.mode: Mode = "refuse"
        self._rate: float | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def restore(self) -> None:
        self.mode, self._rate = "forward", None
        for link in [k for k in self._links if k.lost_bytes]:
            link.abort()
            self._links.discard(link)
        await self._listen()

    async def throttle(self, bytes_per_s: float) -> None:
        await self.restore()
        self._rate = bytes_per_s

    async def blackhole(self) -> None:
        self.mode = "blackhole"
        await self._listen()

    async def refuse(self) -> None:
        self.mode = "refuse"
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for link in self._links:
            link.abort()
        self._links.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        try:
            if self.mode == "blackhole":
                link.lost_bytes = True
                await self._swallow(reader)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                writer.transport.abort()
                return
            link.writers.append(up_writer)
            await asyncio.gather(
                self._pipe(reader, up_writer, link), self._pipe(up_reader, writer, link)
            )
        finally:
            self._links.discard(link)

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while await reader.read(65536):
                pass

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                if self.mode == "blackhole" or link.lost_bytes:
                    link.lost_bytes = True
                    continue
                if self._rate is not None:
                    await asyncio.sleep(len(data) / self._rate)
                dst.write(data)
                await dst.drain()
        dst.transport.abort()


class ThreadedProxy:
    """A :class:`TcpProxy` on an event loop of its own thread, forwarding once built."""

    def __init__(self, host: str, port: int) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._proxy = TcpProxy(host, port, self.port)
        self.restore()

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    @property
    def mode(self) -> Mode:
        return self._proxy.mode

    def restore(self) -> None:
        self._run(self._proxy.restore())

    def refuse(self) -> None:
        self._run(self._proxy.refuse())

    def blackhole(self) -> None:
        self._run(self._proxy.blackhole())

    def throttle(self, bytes_per_s: float) -> None:
        self._run(self._proxy.throttle(bytes_per_s))

    def set(self, mode: Mode) -> None:
        {"forward": self.restore, "refuse": self.refuse, "blackhole": self.blackhole}[mode]()

    def close(self) -> None:
        self.refuse()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
