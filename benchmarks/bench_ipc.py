"""The engine boundary's costs on this machine: encoding one step's outputs (msgspec msgpack,
as the engine server does, against stdlib json and pickle), and a ZeroMQ round trip between
two processes over ipc:// (a ping and its answer, as a gateway process sees it).

    .venv/bin/python benchmarks/bench_ipc.py [--batch 256] [--rounds 2000]

No GPU, no model: the values are the real structs of ``engine/wire.py``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec
import zmq

from loraplex.engine.api import ChoiceTokens, EngineOutput, Request, SamplingParams
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


def _echo_server(address: str, ready) -> None:  # type: ignore[no-untyped-def]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    ready.set()
    enc = encoder()
    answer = enc.encode(Status("engine", "ready"))
    while True:
        ident, data = sock.recv_multipart()
        if data == b"stop":
            break
        sock.send_multipart([ident, answer])
    sock.close(0)
    ctx.term()


def round_trip_us(rounds: int) -> tuple[float, float]:
    address = f"ipc://{tempfile.mkdtemp(prefix='lpx-ipc-')}/bench.sock"
    ready = mp.Event()
    proc = mp.Process(target=_echo_server, args=(address, ready))
    proc.start()
    ready.wait(10)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    ping = encoder().encode(Ping())
    dec = client_decoder()
    samples = []
    for i in range(rounds + 100):
        t = time.perf_counter()
        sock.send(ping)
        dec.decode(sock.recv())
        if i >= 100:
            samples.append((time.perf_counter() - t) * 1e6)
    sock.send(b"stop")
    proc.join(10)
    sock.close(0)
    ctx.term()
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
    p50, p99 = round_trip_us(args.rounds)
    print(f"\nZeroMQ ipc round trip (ping -> status), {args.rounds} rounds: "
          f"p50 {p50:.1f} us, p99 {p99:.1f} us")  # fmt: skip


if __name__ == "__main__":
    main()
