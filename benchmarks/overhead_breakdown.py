"""Where the gateway's time for a ``max_tokens: 1`` completion goes, stage by stage.

Copies this checkout to a scratch directory, inserts a timestamp (``time.perf_counter_ns``:
CLOCK_MONOTONIC, one clock for every process) at each stage boundary of the request path
(``POINTS``: uvicorn's read, the fast route, auth, admission, the hand-over to the engine and
back, metering, the response), runs ``bench_gateway_overhead.py`` from that copy (so both
variants, ``serve`` and ``inproc``, run the instrumented code), and prints each stage's
p50 and p90 over the timed requests. Each process appends its stamps to
``<scratch>/traces/<variant>-<pid>.txt``; the stamps of a request are found from its
``g1_authed`` stamp (requests run one at a time). The stamps add ~1 us each, so the
stages' sum is a little above the benchmark's own p50. A point whose anchor line is gone
from the code stops the script: update ``POINTS`` with the code.

    .venv/bin/python benchmarks/overhead_breakdown.py [--requests 1500] [--boost realtime]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (file, a line of it (unique; compared stripped unless given with its indentation), the
# stamp's name, inserted "before" or "after" it)
POINTS = [
    ("gateway/http_protocol.py", "def on_response_complete(self) -> None:", "h0_data", "data"),
    ("gateway/fast_routes.py", 'if scope["type"] != "http" or scope["method"] != "POST":',
     "g0_fast", "before"),
    ("gateway/fast_routes.py", "self.ran += 1", "g1_authed", "after"),
    ("gateway/inference.py", "if self._limiter is not None:", "g2_start", "before"),
    ("gateway/inference.py", "key, weight, tier = spec.principal.fairness", "g3_admitted",
     "before"),
    ("engine/client_streams.py", "send_add(request)", "g4_send", "before"),
    ("engine/client_streams.py", "send_add(request)", "g4_sent", "after"),
    ("engine/server.py", "rid = msg.request.request_id", "e0_add", "before"),
    ("engine/step_loop.py", "engine.add_request(arg)", "e1_step_add", "before"),
    ("engine/server.py", 'self._out.put(("outputs", outputs))', "e2_emit", "before"),
    ("engine/inproc_client.py", "loop.call_soon_threadsafe(self._deliver, outputs)", "e2_emit",
     "before"),
    ("engine/server.py", "self._send(ident, Outputs(outs))", "e3_sent", "after"),
    ("engine/remote_client.py", "frames = self._reader.feed(data)", "g5_readable", "before"),
    ("engine/remote_client.py", "aborts = self._streams.deliver(msg.outputs)", "g5_decoded",
     "before"),
    ("engine/client_streams.py", "item = await stream.queue.get()", "g5_resumed", "after"),
    ("gateway/inference.py", "self._finished = True", "g6_finish", "before"),
    ("gateway/inference.py", "await self._meter(status)", "g7_meter", "before"),
    ("gateway/ledger.py", "        self._metrics.observe_usage(event, tenant)", "m1_observed",
     "after"),
    ("gateway/ledger.py", "        self._syncer.committed()", "m2_appended", "before"),
    ("gateway/inference.py", "await self._meter(status)", "g7_metered", "after"),
    ("gateway/routes/completions.py", "result = Completion(", "g7_collected", "before"),
    ("gateway/fast_routes.py",
     "response = await route.endpoint(body=model, principal=principal, services=services)",
     "g8_built", "after"),
    ("gateway/http_protocol.py", "self._transport.write(data)", "h9_written", "after"),
]  # fmt: skip
ORDER = [
    "h0_data", "g0_fast", "g1_authed", "g2_start", "g3_admitted", "g4_send", "g4_sent",
    "e0_add", "e1_step_add", "e2_emit", "e3_sent", "g5_readable", "g5_decoded", "g5_resumed",
    "g6_finish", "g7_meter", "m1_observed", "m2_appended", "g7_metered", "g7_collected",
    "g8_built", "h9_written",
]  # fmt: skip
LABELS = {
    "g0_fast": "uvicorn's parse and task, the middleware to the fast route",
    "g1_authed": "body read, JSON parse, API key check, body validation",
    "g2_start": "endpoint: model resolution, prompt, sampling parameters",
    "g3_admitted": "limiter admit",
    "g4_send": "request built, engine stream opened (prompt checked)",
    "g4_sent": "encoded and sent (serve: the socket; inproc: queued for the step)",
    "e0_add": "socket to the engine's waiting thread (idle: the step thread), decoded",
    "e1_step_add": "to add_request (serve: same thread; inproc: the step thread's wake-up)",
    "e2_emit": "ENGINE'S OWN TIME (add_request, step, outputs)",
    "e3_sent": "outputs encoded and sent",
    "g5_readable": "socket back to the gateway's event loop",
    "g5_decoded": "received, decoded",
    "g5_resumed": "output processor, the request's task resumed (inproc: from the step)",
    "g6_finish": "collect, finish",
    "g7_meter": "stream closed",
    "m1_observed": "usage event, metrics",
    "m2_appended": "usage row committed to the outbox",
    "g7_metered": "limiter settled",
    "g7_collected": "back in the route",
    "g8_built": "response object and JSON",
    "h9_written": "response through the middleware, written to the socket",
}
STAMP = "__import__('overhead_trace').t({tag!r})"
TRACER = """import os, time
_buf = []
_path = None
def t(tag):
    global _path
    _buf.append((time.perf_counter_ns(), tag))
    if len(_buf) >= 200:
        if _path is None:
            label = os.path.basename(os.environ.get("LORAPLEX_DATA_DIR", "x"))
            _path = f"{TRACES}/{label}-{os.getpid()}.txt"
        with open(_path, "a") as f:
            f.write("".join(f"{a} {b}\\n" for a, b in _buf))
        _buf.clear()
"""


def instrument(tree: Path, traces: Path) -> None:
    (tree / "overhead_trace.py").write_text(TRACER.replace("{TRACES}", str(traces)))
    for path, anchor, tag, where in POINTS:
        file = tree / path
        lines = file.read_text().split("\n")
        exact = anchor != anchor.lstrip()
        hits = [i for i, x in enumerate(lines) if (x if exact else x.strip()) == anchor]
        if len(hits) != 1:
            raise SystemExit(f"{path}: {len(hits)} lines are {anchor!r}; update POINTS")
        i = hits[0]
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        if where == "data":  # a method of the protocol class, before this one
            lines[i:i] = [
                f"{indent}def data_received(self, data):",
                f"{indent}    {STAMP.format(tag=tag)}",
                f"{indent}    super().data_received(data)",
                "",
            ]
        else:
            lines.insert(i if where == "before" else i + 1, indent + STAMP.format(tag=tag))
        file.write_text("\n".join(lines))


def stages(traces: Path, variant: str) -> list[dict[str, int]]:
    events: list[tuple[int, str]] = []
    for f in traces.glob(f"{variant}-*.txt"):
        for line in f.read_text().splitlines():
            ns, tag = line.split()
            events.append((int(ns), tag))
    events.sort()
    rows = []
    for i, (ns, tag) in enumerate(events):
        if tag != "g1_authed":
            continue
        row = {tag: ns}
        j = i  # back: this request's fast route entry and uvicorn's read
        for want in ("g0_fast", "h0_data"):
            while j > 0 and events[j][1] != want:
                j -= 1
            if events[j][1] == want:
                row[want] = events[j][0]
        for ns2, tag2 in events[i + 1 :]:
            if tag2 in ("g1_authed", "h0_data"):
                break
            row.setdefault(tag2, ns2)
            if tag2 == "h9_written":
                break
        rows.append(row)
    return rows


def report(rows: list[dict[str, int]], variant: str) -> None:
    present = [t for t in ORDER if sum(t in r for r in rows) > 0.9 * len(rows)]
    print(f"\n{variant}: {len(rows)} requests; us from the previous stamp")
    print(f"  {'stage (up to the stamp)':72} {'p50':>7} {'p90':>7}")
    gateway = 0.0
    for a, b in itertools.pairwise(present):
        d = sorted((r[b] - r[a]) / 1000 for r in rows if a in r and b in r)
        p50 = statistics.median(d)
        if b != "e2_emit":
            gateway += p50
        print(f"  {b + ': ' + LABELS.get(b, ''):72} {p50:7.1f} {d[int(0.9 * len(d))]:7.1f}")
    print(f"  {'sum of the p50s but the engine':72} {gateway:7.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--boost", choices=["nice", "realtime"])
    p.add_argument("--keep", action="store_true", help="keep the scratch copy and traces")
    args = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lpx-breakdown-"))
    try:
        tree, traces = scratch / "tree", scratch / "traces"
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                               capture_output=True).stdout.decode().split("\0")  # fmt: skip
        for name in filter(None, files):
            src, dst = REPO / name, tree / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                dst.symlink_to(src.readlink())
            elif src.exists():
                shutil.copy2(src, dst)
        traces.mkdir()
        instrument(tree, traces)
        cmd = [sys.executable, str(tree / "benchmarks" / "bench_gateway_overhead.py"),
               "--requests", str(args.requests), "--variants", "serve,inproc"]  # fmt: skip
        if args.boost:
            cmd += ["--boost", args.boost]
        subprocess.run(cmd, check=True)
        for variant in ("serve", "inproc"):
            report(stages(traces, variant)[100:], variant)  # (the first ones: warm-up)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
