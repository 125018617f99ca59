"""The engine boundary's costs on this machine: encoding one step's outputs (msgspec msgpack,
as the engine server does, against stdlib json and pickle), and a round trip between two
processes (a ping and its answer, as a gateway process sees it) over the engine's transport
(``engine.transport``: framed messages on a Unix socket) and over ZeroMQ's ROUTER/DEALER
on ipc://, which the engine used before.

    .venv/bin/python benchmarks/bench_ipc.py [--batch 256] [--rounds 2000]

No GPU, no model: the values are the real structs of ``engine/wire.py``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pickle
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec
import zmq

from loraplex.engine.api import ChoiceTokens, EngineOutput, Request, SamplingParams
from loraplex.engine.transport import FrameReader, frame, listen, parse_address, tune
from loraplex.engine.wire import Add, Outputs, Ping, Status, client_decoder, encoder


def step_outputs(batch: int) -> Outputs:
    return Outputs(
        [
            EngineOutput(f"cmpl-{i:032x}", [ChoiceTokens(0, [1000 + i])], 256, 0, False)
            for i in range(batch)
        ]
    )


def per_call_us(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def codecs(batch: int) -> list[tuple[str, float, float, int]]:
    msg = step_outputs(batch)
    enc, dec = encoder(), client_decoder()
    raw = msgspec.to_builtins(msg)
    rows = []
    data = enc.encode(msg)
    rows.append(("msgspec msgpack (typed)", per_call_us(lambda: enc.encode(msg), 200),
                 per_call_us(lambda: dec.decode(data), 200), len(data)))  # fmt: skip
    js = json.dumps(raw).encode()
    rows.append(("stdlib json (of builtins)", per_call_us(lambda: json.dumps(raw).encode(), 200),
                 per_call_us(lambda: json.loads(js), 200), len(js)))  # fmt: skip
    pk = pickle.dumps(msg)
    rows.append(("pickle (of the structs)", per_call_us(lambda: pickle.dumps(msg), 200),
                 per_call_us(lambda: pickle.loads(pk), 200), len(pk)))  # fmt: skip
    return rows


def _zmq_echo(address: str, ready) -> None:  # type: ignore[no-untyped-def]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    ready.set()
    answer = encoder().encode(Status("engine", "ready"))
    while True:
        ident, data = sock.recv_multipart()
        if data == b"stop":
            break
        sock.send_multipart([ident, answer])
    sock.close(0)
    ctx.term()


def _framed_echo(address: str, ready) -> None:  # type: ignore[no-untyped-def]
    """As the engine server reads and answers: a selector over the connection."""
    listener = listen(address)
    ready.set()
    answer = bytes(frame(encoder(), Status("engine", "ready")))
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    conn, reader = None, FrameReader()
    while True:
        for key, _ in sel.select(1.0):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                tune(conn)
                sel.register(conn, selectors.EVENT_READ)
                continue
            assert conn is not None
            for payload in reader.feed(conn.recv(1 << 16)):
                if bytes(payload) == b"stop":
                    conn.close()
                    listener.close()
                    return
                conn.send(answer)


def round_trip_us(transport: str, rounds: int) -> tuple[float, float]:
    """p50 and p99 of a ping and its status, between this process and another."""
    address = f"ipc://{tempfile.mkdtemp(prefix='lpx-ipc-')}/bench.sock"
    ready = mp.Event()
    server = _zmq_echo if transport == "zmq" else _framed_echo
    proc = mp.Process(target=server, args=(address, ready))
    proc.start()
    ready.wait(10)
    enc, dec = encoder(), client_decoder()
    if transport == "zmq":
        ctx = zmq.Context()
        zsock = ctx.socket(zmq.DEALER)
        zsock.connect(address)
        ping = enc.encode(Ping())

        def once() -> None:
            zsock.send(ping)
            dec.decode(zsock.recv())

        def stop() -> None:
            zsock.send(b"stop")
            zsock.close(0)
            ctx.term()
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(parse_address(address)[1])
        ping, reader = bytes(frame(enc, Ping())), FrameReader()

        def once() -> None:
            sock.send(ping)
            while not (got := reader.feed(sock.recv(1 << 16))):
                pass
            dec.decode(got[0])

        def stop() -> None:
            sock.send(len(b"stop").to_bytes(4, "little") + b"stop")
            sock.close()

    samples = []
    for i in range(rounds + 100):
        t = time.perf_counter()
        once()
        if i >= 100:
            samples.append((time.perf_counter() - t) * 1e6)
    stop()
    proc.join(10)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * len(samples))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256, help="requests with a new token this step")
    p.add_argument("--rounds", type=int, default=2000)
    args = p.parse_args()
    add = Add(Request("cmpl-x", list(range(256)), SamplingParams(max_tokens=128)))
    enc = encoder()
    print(f"one Add of a 256-token prompt: {len(enc.encode(add))} bytes, "
          f"{per_call_us(lambda: enc.encode(add), 2000):.1f} us to encode")  # fmt: skip
    print(f"\none step's Outputs, {args.batch} requests x 1 token:")
    print(f"{'codec':28} {'encode us':>10} {'decode us':>10} {'bytes':>8}")
    for name, e, d, n in codecs(args.batch):
        print(f"{name:28} {e:10.1f} {d:10.1f} {n:8d}")
    print(f"\nround trip between two processes (ping -> status), {args.rounds} rounds:")
    for transport, label in (("framed", "framed Unix socket (engine.transport)"),
                             ("zmq", "ZeroMQ ROUTER/DEALER over ipc://")):  # fmt: skip
        p50, p99 = round_trip_us(transport, args.rounds)
        print(f"  {label:40} p50 {p50:7.1f} us, p99 {p99:7.1f} us")


if __name__ == "__main__":
    main()
