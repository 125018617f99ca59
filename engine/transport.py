"""The engine boundary's transport: length-prefixed frames over one stream socket per
gateway process (a Unix socket for ``ipc://PATH``, TCP for ``tcp://HOST:PORT``).

Each frame is a 4-byte little-endian length and that many bytes of one msgpack message
(``engine.wire``). The kernel's socket is the whole channel: a message written by the
gateway's event loop is read by the engine server's thread at its next wake-up, with no
broker or I/O thread in between. ZeroMQ, used here before, puts its own I/O thread on
each side of every message (a ROUTER/DEALER round trip between two processes takes two to
four times as long as this on the 2-core dev box: ``benchmarks/bench_ipc.py``),
and the connection events this channel needs (a gateway gone, an engine back) are the
socket's own EOF and connect here.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from typing import Any

import msgspec

HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30  # a length past this is not a message of ours: the peer is dropped


class FrameError(ValueError):
    """The peer sent something that is not a frame of this protocol."""


def frame(encoder: msgspec.msgpack.Encoder, msg: Any) -> bytearray:
    """``msg`` encoded behind its length."""
    buf = bytearray(HEADER.size)
    encoder.encode_into(msg, buf, HEADER.size)
    HEADER.pack_into(buf, 0, len(buf) - HEADER.size)
    return buf


class FrameReader:
    """Cuts a byte stream into frames' payloads."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes | memoryview]:
        buf = self._buf
        if not buf and len(data) >= HEADER.size:  # the usual case: one whole frame a read
            (n,) = HEADER.unpack_from(data, 0)
            if len(data) == HEADER.size + n and n <= MAX_FRAME:
                return [memoryview(data)[HEADER.size :]]
        buf += data
        frames: list[bytes | memoryview] = []
        start = 0
        while len(buf) - start >= HEADER.size:
            (n,) = HEADER.unpack_from(buf, start)
            if n > MAX_FRAME:
                raise FrameError(f"a frame of {n} bytes (at most {MAX_FRAME})")
            end = start + HEADER.size + n
            if end > len(buf):
                break
            frames.append(bytes(buf[start + HEADER.size : end]))
            start = end
        del buf[:start]
        return frames


def parse_address(address: str) -> tuple[int, Any]:
    """``ipc:///path.sock`` -> (AF_UNIX, path); ``tcp://host:port`` (``*`` for every
    interface, ``[v6]`` in brackets) -> (AF_INET or AF_INET6, (host, port))."""
    if address.startswith("ipc://"):
        path = address.removeprefix("ipc://")
        if not path:
            raise ValueError(f"no socket path in {address!r}")
        return socket.AF_UNIX, path
    if address.startswith("tcp://"):
        rest = address.removeprefix("tcp://")
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"no port in {address!r} (tcp://host:port)")
        if host.startswith("[") and host.endswith("]"):
            return socket.AF_INET6, (host[1:-1], int(port))
        if host in ("*", ""):
            host = "0.0.0.0"
        return socket.AF_INET, (host, int(port))
    raise ValueError(f"an engine address is tcp://host:port or ipc:///path, not {address!r}")


def listen(address: str) -> socket.socket:
    """A non-blocking listening socket on ``address``; a Unix socket file left by a dead
    server is replaced."""
    family, where = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            try:
                if stat.S_ISSOCK(os.stat(where).st_mode):
                    os.unlink(where)
            except FileNotFoundError:
                pass
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def tune(sock: socket.socket) -> None:
    """A connected socket: non-blocking, and on TCP each frame sent at once."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
