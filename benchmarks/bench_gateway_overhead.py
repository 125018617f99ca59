"""What the gateway adds to a request: HTTP latency minus the engine's own time for it.

``loraplex serve --model dummy:tiny`` on its embedded defaults (SQLite: API keys are looked
up in the database, then cached; the usage outbox; limits on: the tenant has a
requests-per-minute limit, so every request is admitted and settled), one request at a time
(concurrency 1), each a non-streamed ``max_tokens: 1`` completion. The engine reports its
own time for the request in ``Server-Timing: engine;dur=<ms>``: from its step loop taking
the request (``LLMEngine.add_request``) to the creation of its last output. Everything
else is counted as the gateway's: HTTP, auth, model resolution, limits, the hand-over to
the step loop and back (in ``serve`` the ZeroMQ hops and the engine process's I/O thread),
the output processor, metering, and the client's own share: the client is one keep-alive
socket writing ready-made request bytes and reading the response by its Content-Length,
so it adds little. A ``GET /health`` round trip on the same connection is printed as the
client-and-HTTP floor. With ``inproc`` the step loop shares the gateway's GIL: gateway work
that runs during a step (a background ledger drain) lengthens the engine's own time.

Variants (``--variants``): ``serve`` (the engine in its own process, the gateway worker
reaching it over ZeroMQ) and ``inproc`` (``serving_inproc.py``: the same app with the
engine's step loop in a thread of the gateway's process). ``--baseline PATH`` runs every
variant again from another checkout's code (labelled ``@base``, or ``@LABEL`` given as
``LABEL=PATH``; repeatable). All servers run at once and the requests go round-robin over
them (the order rotating each round), so a machine shared with other work loads every
variant alike. The engine runs one torch thread (``--torch-threads``): two OpenMP threads on
the 2-core box spin between ops and take the CPU the gateway needs. ``--boost realtime``
(Linux, root) runs the client and servers SCHED_FIFO, which on a machine loaded by other
work approximates an idle one; ``nice`` raises their (autogroup) nice value only.

    .venv/bin/python benchmarks/bench_gateway_overhead.py [--requests 2000] [--workers 1]
        [--variants serve,inproc] [--baseline [LABEL=]PATH] [--boost realtime] [--adapter]

``--adapter``: the requests name an adapter the tenant uploaded (rank 16, the model's
shapes) instead of the base model, which adds the model's resolution to every request.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_server import REPO, ServeProcess, descendants, free_port


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and every process below it (Linux /proc)."""
    ticks = 0
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def boost(pid: int, how: str) -> None:
    """Raise the CPU priority of ``pid``, every process below it and all their threads
    (Linux, root). ``nice``: nice -19, for their autogroups too (with autogroups on, each
    session's processes share the CPU with other sessions by the group's nice value).
    ``realtime``: SCHED_FIFO, so they run as soon as they are woken, as on an idle machine
    (the kernel keeps 5 % of each second for everything else)."""
    for p in [pid, *descendants(pid)]:
        try:
            Path(f"/proc/{p}/autogroup").write_text("-19")
        except OSError:
            pass
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                if how == "realtime":
                    os.sched_setscheduler(int(task.name), os.SCHED_FIFO, os.sched_param(10))
                else:
                    os.setpriority(os.PRIO_PROCESS, int(task.name), -19)
            except OSError:
                pass


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


@dataclass
class Target:
    label: str
    serve: ServeProcess
    total: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    http: RawHttp | None = None
    post: bytes = b""
    probe: bytes = b""
    cpu_s: float = 0.0  # the server's processes, over the timed requests

    def setup(self, model: str, workers: int, adapter: Path | None = None) -> None:
        """Wait for it, make a tenant with a limit and its key (and ``adapter`` uploaded
        as its adapter ``bench-adapter``, which the requests then name), prepare the
        requests."""
        token = self.serve.admin_token(180)
        self.serve.wait_ready(180, workers)
        admin = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=self.serve.url, headers=admin, timeout=30) as c:
            c.post("/admin/v1/tenants", json={"name": "bench",
                   "limits": {"requests_per_minute": 1_000_000}}).raise_for_status()  # fmt: skip
            key = c.post("/admin/v1/tenants/bench/keys", json={"scopes": ["inference"]})
            key.raise_for_status()
            if adapter is not None:
                files = [("files", (f, (adapter / f).read_bytes()))
                         for f in ("adapter_config.json", "adapter_model.safetensors")]  # fmt: skip
                c.post("/admin/v1/tenants/bench/adapters", data={"name": "bench-adapter"},
                       files=files).raise_for_status()  # fmt: skip
                model = "bench-adapter"
        auth = {"Authorization": f"Bearer {key.json()['key']}"}
        body = json.dumps({"model": model, "prompt": [10, 11, 12, 13, 14, 15, 16, 17],
                           "max_tokens": 1, "temperature": 0}).encode()  # fmt: skip
        self.http = http = RawHttp(self.serve.url)
        self.post = http.prepare("POST", "/v1/completions",
                                 {**auth, "Content-Type": "application/json"}, body)  # fmt: skip
        self.probe = http.prepare("GET", "/health", {})

    def once(self, keep: bool) -> None:
        assert self.http is not None
        t0 = time.perf_counter()
        status, headers, body = self.http.roundtrip(self.post)
        took = (time.perf_counter() - t0) * 1000
        if status != 200:
            raise SystemExit(f"{self.label}: completion: HTTP {status}: {body[:300]!r}")
        t0 = time.perf_counter()
        self.http.roundtrip(self.probe)
        floor = (time.perf_counter() - t0) * 1000
        if keep:
            self.total.append(took)
            self.engine.append(float(headers["server-timing"].split("dur=")[1]))
            self.health.append(floor)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="timed requests per variant")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", default="dummy:tiny")
    p.add_argument("--variants", default="serve,inproc", help="of serve, inproc")
    p.add_argument("--baseline", action="append", default=[], metavar="[LABEL=]PATH",
                   help="another checkout whose code runs too (repeatable; label: base)")  # fmt: skip
    p.add_argument("--boost", choices=["nice", "realtime"],
                   help="raise the benchmark's and the servers' CPU priority (Linux, root): "
                   "a shared machine's other work then disturbs the measurement less")  # fmt: skip
    p.add_argument("--adapter", action="store_true",
                   help="the requests name a rank-16 adapter of the model (uploaded first)")  # fmt: skip
    p.add_argument("--torch-threads", type=int, default=1,
                   help="the engine's intra-op threads (OMP_NUM_THREADS; 0: torch's default)")  # fmt: skip
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - {"serve", "inproc"}:
        p.error("--variants takes serve and/or inproc")
    trees = [("", REPO)]
    for spec in args.baseline:
        label, _, path = spec.rpartition("=")
        trees.append(("@" + (label or "base"), Path(path).resolve()))
    with tempfile.TemporaryDirectory(prefix="lpx-overhead-") as tmp, ExitStack() as stack:
        targets = []
        for suffix, repo in trees:
            for variant in variants:
                settings = {
                    "LORAPLEX_MODEL": args.model,
                    "LORAPLEX_DEVICE": "cpu",
                    "LORAPLEX_PORT": str(free_port()),
                    "LORAPLEX_WORKERS": str(args.workers),
                    "LORAPLEX_KV_CACHE_BYTES": str(64 << 20),
                }
                if args.torch_threads > 0:
                    settings["OMP_NUM_THREADS"] = str(args.torch_threads)
                argv = None
                if variant == "inproc":
                    argv = [sys.executable, str(REPO / "benchmarks" / "serving_inproc.py")]
                label = variant + suffix
                data = Path(tmp) / label
                serve = ServeProcess.start(settings, data, argv=argv, repo=repo)
                stack.callback(serve.stop)
                targets.append(Target(label, serve))
        adapter = None
        if args.adapter:
            from common import write_peft_adapter

            from loraplex.engine.model.presets import PRESETS

            adapter = Path(tmp) / "adapter"
            write_peft_adapter(adapter, PRESETS[args.model.removeprefix("dummy:")], 16, seed=1)
        for t in targets:
            t.setup(args.model, args.workers, adapter)
        if args.boost:
            boost(os.getpid(), args.boost)  # this process and every server below it
        n = len(targets)
        for i in range(args.warmup + args.requests):
            if i == args.warmup:
                for t in targets:
                    t.cpu_s = -cpu_seconds(t.serve.proc.pid)
            k = i % n
            for t in targets[k:] + targets[:k]:
                t.once(keep=i >= args.warmup)
        for t in targets:
            t.cpu_s += cpu_seconds(t.serve.proc.pid)
        on = f"a rank-16 adapter of {args.model}" if args.adapter else args.model
        print(f"{args.requests} requests per variant, max_tokens 1, concurrency 1, "
              f"{args.workers} gateway worker(s), {on} on cpu; variants interleaved"
              + (f"; priority raised ({args.boost})" if args.boost else ""))  # fmt: skip
        print(f"{'ms':34} {'p50':>7} {'p90':>7} {'p99':>7} {'mean':>7}")
        for t in targets:
            over = [a - e for a, e in zip(t.total, t.engine, strict=True)]
            for name, xs in (("HTTP latency", t.total), ("engine's own time", t.engine),
                             ("latency - engine", over), ("GET /health (floor)", t.health)):  # fmt: skip
                print(f"{t.label + ': ' + name:34} {pct(xs, 0.5):7.3f} {pct(xs, 0.9):7.3f} "
                      f"{pct(xs, 0.99):7.3f} {statistics.mean(xs):7.3f}")  # fmt: skip
        print("server CPU ms per request (all its processes; completion + /health):")
        for t in targets:
            print(f"  {t.label:32} {t.cpu_s * 1000 / args.requests:7.3f}")


if __name__ == "__main__":
    main()
