"""What the gateway adds to a request: HTTP latency minus the engine's own time for it.

``loraplex serve --model dummy:tiny`` on its embedded defaults (SQLite: API keys are looked
up in the database, then cached; the durable usage outbox; limits on: the tenant has a
requests-per-minute limit, so every request is admitted and settled), one request at a time
(concurrency 1), each a non-streamed ``max_tokens: 1`` completion. The engine reports its
own time for the request in ``Server-Timing: engine;dur=<ms>`` (from taking the request to
its last output, inside the engine process); the rest of the client's latency is the
gateway's (HTTP, auth, model resolution, limits, the engine round trip over ZeroMQ, the
output processor, metering) and the client's own: the client is one keep-alive socket
writing ready-made request bytes and reading the response by its Content-Length, so it
adds little. A ``GET /health`` round trip on the same connection is printed as the
client-and-HTTP floor.

    .venv/bin/python benchmarks/bench_gateway_overhead.py [--requests 500] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_server import ServeProcess, free_port


class RawHttp:
    """HTTP/1.1 over one keep-alive socket; requests are prepared bytes."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host = f"{host}:{port}"
        self.buf = b""

    def prepare(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def roundtrip(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            self.buf += self.sock.recv(65536)
        body, self.buf = self.buf[:n], self.buf[n:]
        return int(status_line.split()[1]), headers, body


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", default="dummy:tiny")
    args = p.parse_args()
    port = free_port()
    settings = {
        "LORAPLEX_MODEL": args.model,
        "LORAPLEX_DEVICE": "cpu",
        "LORAPLEX_PORT": str(port),
        "LORAPLEX_WORKERS": str(args.workers),
        "LORAPLEX_KV_CACHE_BYTES": str(64 << 20),
    }
    with tempfile.TemporaryDirectory(prefix="lpx-overhead-") as tmp:
        serve = ServeProcess.start(settings, Path(tmp) / "data")
        try:
            token = serve.admin_token(120)
            serve.wait_ready(120, args.workers)
            admin = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=serve.url, headers=admin, timeout=30) as c:
                c.post("/admin/v1/tenants", json={"name": "bench",
                       "limits": {"requests_per_minute": 1_000_000}}).raise_for_status()  # fmt: skip
                key = c.post("/admin/v1/tenants/bench/keys", json={"scopes": ["inference"]})
                key.raise_for_status()
            auth = {"Authorization": f"Bearer {key.json()['key']}"}
            body = json.dumps({"model": args.model, "prompt": [10, 11, 12, 13, 14, 15, 16, 17],
                               "max_tokens": 1, "temperature": 0}).encode()  # fmt: skip
            c = RawHttp(serve.url)
            post = c.prepare("POST", "/v1/completions",
                             {**auth, "Content-Type": "application/json"}, body)  # fmt: skip
            probe = c.prepare("GET", "/health", {})
            total, engine, health = [], [], []
            for i in range(args.warmup + args.requests):
                t0 = time.perf_counter()
                status, headers, _ = c.roundtrip(post)
                took = (time.perf_counter() - t0) * 1000
                if status != 200:
                    raise SystemExit(f"completion: HTTP {status}")
                t0 = time.perf_counter()
                c.roundtrip(probe)
                floor = (time.perf_counter() - t0) * 1000
                if i < args.warmup:
                    continue
                total.append(took)
                engine.append(float(headers["server-timing"].split("dur=")[1]))
                health.append(floor)
            over = [t - e for t, e in zip(total, engine, strict=True)]
            print(f"{args.requests} requests, max_tokens 1, concurrency 1, {args.workers} "
                  f"gateway worker(s), {args.model} on cpu")  # fmt: skip
            print(f"{'ms':24} {'p50':>7} {'p90':>7} {'p99':>7} {'mean':>7}")
            for name, xs in (("HTTP latency", total), ("engine's own time", engine),
                             ("latency - engine", over), ("GET /health (floor)", health)):  # fmt: skip
                print(f"{name:24} {pct(xs, 0.5):7.3f} {pct(xs, 0.9):7.3f} {pct(xs, 0.99):7.3f} "
                      f"{statistics.mean(xs):7.3f}")  # fmt: skip
        finally:
            serve.stop()


if __name__ == "__main__":
    main()
