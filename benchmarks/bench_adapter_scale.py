"""Adapter loading at scale: the loader's CPU path (old reader vs new, same run), one cold
adapter into GPU memory, aggregate loads/s with N workers, and the engine with 1 to 2,000
adapters host-cached, cold from local disk and cold from the object store, against the
no-adapter engine in the same run.

One command on the GPU machine (H200, ``dummy:llama3-8b`` bf16; about 4 minutes)::

    PYTHONPATH=. python benchmarks/bench_adapter_scale.py --json /tmp/adapter_scale.json

``--smoke`` runs everything small on the CPU (``dummy:tiny``; the CI smoke test).

Sections (``--sections``, all by default):

- ``cpu``: ``read_adapter`` now vs the reader it replaced (``adapter_load_old.py``) on a
  ``--cpu-preset`` (SmolLM2-135M) rank-16 adapter on all seven projections, in the engine's
  dtype, interleaved ``--reps`` times; wall min/median and process CPU time of each.
- ``pin`` (CUDA only): for ``--pin-mib`` (80) bytes, ``--pin-count`` times: a new pinned host
  buffer (each kept, so none comes from torch's caching host allocator) against a reused one
  and a pageable one (page-touched), the host time of a ``non_blocking`` copy from pageable
  memory, and the host time of a tiny kernel launch alone and while another thread pins
  buffers. The loader pins every adapter it reads (``--host-pageable`` turns that off for
  the other sections). Then, each in a process of its own, new pinned buffers under each
  allocator setting of ``PIN_CONFS`` (torch's default ``cudaHostAlloc``, the engine's
  ``configure_pinned_memory``, 16 register threads): one thread's p50 and 4 threads' GB/s.
- ``single``: one cold ``--model``-shaped adapter (rank 16, seven projections: 80 MiB for
  Llama-3-8B) from the page cache into a GPU slot: read (validate, pack, pin) + slot write +
  sync, p50/p99 over ``--reps`` keys; against the file's plain read speed and host-to-GPU
  bandwidth.
- ``aggregate``: ``--files`` distinct adapters (the ``all7`` files) through the engine's ``AdapterLoader`` with
  1/4/8/16 workers: adapters/s and GB/s (``--cold``: from disk, the page cache dropped first).
- ``engine``: per setting (``all7``: rank 16 on seven projections; ``slora``: q,k,v,o with
  ranks 8/16/32/64 mixed, S-LoRA's) and per N in ``--adapters``: issue #26's workload,
  ``--num-requests`` (1,000) of ``--prompt-len``/``--output-len`` (256/128) tokens, adapters
  drawn with Zipf(``--zipf``) popularity, all queued at once, GPU adapter memory at the
  engine's default (a share of free memory, no slot count unless ``--max-loras``); modes
  ``host`` (loaded into the host tier first, when N fits it), ``used`` (host-cached too, but
  only the adapters the run's Zipf picks touch, so 2,000 all-seven-projection adapters fit:
  no load runs beside the steps, against ``disk`` where the run's loads do), ``disk`` (files evicted from
  the page cache first: ``posix_fadvise(DONTNEED)``) and ``store`` (bundles in a local object
  store through the real fetcher and disk cache, N <= ``--store-max``). Above
  ``--distinct-files`` adapters, keys share weight files (each key is still a distinct
  adapter to the engine; its bytes repeat on disk and in the page cache). Output tok/s
  against the no-adapter engine; loads in the run, their latency p50/p99 per source tier
  (queue + fetch + read: the loads before a host-cached run are not counted); loads/s;
  distinct adapters and adapter GB per step (what the LoRA kernels read) and the bound
  those bytes put on the ratio, ``T0 / (T0 + bytes / BW)`` (``bench_throughput``'s).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapter_load_old import read_adapter_old
from bench_throughput import preload, run_engine_case, warm_up
from common import (
    bound_bandwidth,
    bytes_bound,
    device_info,
    pick_device,
    table,
    write_json,
    write_peft_adapter,
    zipf_indices,
)

from loraplex.engine.api import AdapterRef
from loraplex.engine.config import EngineConfig, host_memory_bytes
from loraplex.engine.llm_engine import LLMEngine, loader_threads
from loraplex.engine.lora.loader import AdapterLoader
from loraplex.engine.lora.weights import read_adapter
from loraplex.engine.model.presets import PRESETS
from loraplex.engine.model_runner import ModelRunner
from loraplex.heap import freeze_heap

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dummy:llama3-8b")
    p.add_argument("--cpu-preset", default="smollm2-135m")
    p.add_argument("--sections", default="cpu,pin,single,aggregate,engine")
    p.add_argument("--pin-mib", type=float, default=80.0, help="pin section: buffer size")
    p.add_argument("--pin-count", type=int, default=16, help="pin section: buffers per case")
    p.add_argument(
        "--heap", choices=("frozen", "default"), default="frozen",
        help="engine section: gc.freeze() after the warm-up, as the engine server does "
        "(frozen), or the collector as Python starts it (default)",
    )  # fmt: skip
    p.add_argument(
        "--host-pageable", action="store_true",
        help="the runner reads adapters into pageable host memory instead of pinned",
    )  # fmt: skip
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--files", type=int, default=64, help="adapters of the aggregate section")
    p.add_argument(
        "--cold", action="store_true",
        help="aggregate section: the files evicted from the page cache before each worker count",
    )  # fmt: skip
    p.add_argument("--workers", default="1,4,8,16")
    p.add_argument("--adapters", default="1,32,512,2000")
    p.add_argument("--settings", default="all7,slora")
    p.add_argument("--modes", default="host,used,disk,store")
    p.add_argument("--distinct-files", type=int, default=64)
    p.add_argument("--store-max", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--max-loras", type=int, default=None, help="cap on resident adapters (default: none)"
    )
    p.add_argument("--load-workers", type=int, default=8)
    p.add_argument(
        "--host-bytes",
        type=int,
        default=None,
        help="host tier; default: the engine's, raised for a host-cached case up to 0.6 of RAM",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=None,
        help="GB/s of the engine's bytes bound (default: measured on CUDA, else 4200 nominal)",
    )
    p.add_argument("--json", default=None)
    p.add_argument(
        "--busy-steps", type=int, default=0,
        help="GPU busy over this many steps of each case (CUDA events; 0: not measured)",
    )  # fmt: skip
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    args.busy_window_at = 0.3  # bench_throughput's run_engine_case reads it (and busy_steps)
    if args.smoke:
        args.model, args.cpu_preset, args.reps, args.files, args.workers = (
            "dummy:tiny", "tiny", 3, 6, "1,2")  # fmt: skip
        args.adapters, args.distinct_files, args.store_max, args.num_requests = "1,3", 2, 3, 6
        args.prompt_len, args.output_len, args.max_num_seqs = 4, 2, 8
        args.max_num_batched_tokens, args.max_loras, args.load_workers = 128, 2, 2
    return args


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def evict_from_page_cache(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def file_read_gbs(path: Path, reps: int = 5) -> float:
    """Plain read() of a file in the page cache into a reused buffer: the host's limit."""
    size = path.stat().st_size
    buf = bytearray(size)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            f.readinto(buf)
        best = min(best, time.perf_counter() - t0)
    return size / best / 1e9


def h2d_gbs(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """Host (pinned) to GPU copy of ``nbytes``, median of ``reps``: the copy's limit."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    return nbytes / pct(times, 0.5) / 1e9


# -- cpu: the loader's CPU path, old vs new ------------------------------------------------


def section_cpu(args, device: torch.device, root: Path) -> list[dict]:
    cfg = PRESETS[args.cpu_preset]
    path = write_peft_adapter(root / "cpu", cfg, 16, targets=ALL7)
    dt = dtype_for(device)
    readers = {
        "old": lambda: read_adapter_old(path, cfg, max_rank=64, dtype=dt),
        "new": lambda: read_adapter(path, cfg, max_rank=64, dtype=dt),
    }
    rows = []
    threads = torch.get_num_threads()
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in readers}
        for fn in readers.values():
            fn()  # warm: imports, allocator
        # in alternating blocks: both see the same machine, and each its own steady state of
        # the allocator (the new reader's pool keeps the buffers the old one's frees left
        # to glibc; call by call, the old one then faults in fresh pages every time)
        for block in range(6):
            for name, fn in readers.items():
                for _ in range(args.reps // 6 + (block < args.reps % 6)):
                    w0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    res[name].append((time.perf_counter() - w0, time.process_time() - c0))
        row: dict = {"preset": args.cpu_preset, "dtype": str(dt).removeprefix("torch.")}
        row["torch_threads"] = n_threads
        row["file_mib"] = (path / "adapter_model.safetensors").stat().st_size / 2**20
        for name, xs in res.items():
            wall, cpu = [x[0] * 1e3 for x in xs], [x[1] * 1e3 for x in xs]
            row[f"{name}_wall_min_ms"], row[f"{name}_wall_p50_ms"] = min(wall), pct(wall, 0.5)
            row[f"{name}_cpu_p50_ms"] = pct(cpu, 0.5)  # process CPU time (all threads)
        row["speedup_wall_min"] = row["old_wall_min_ms"] / row["new_wall_min_ms"]
        row["speedup_wall_p50"] = row["old_wall_p50_ms"] / row["new_wall_p50_ms"]
        row["speedup_cpu_p50"] = row["old_cpu_p50_ms"] / row["new_cpu_p50_ms"]
        rows.append(row)
    torch.set_num_threads(threads)
    print("\nloader CPU path, old vs new (same run)\n" + table(rows, list(rows[0])), flush=True)
    return rows


# -- single: one cold adapter into a GPU slot -------------------------------------------------


def make_runner(args, device: torch.device) -> ModelRunner:
    return ModelRunner(
        args.model,
        device=device,
        dtype=dtype_for(device),
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.prompt_len + args.output_len + 16,
        max_loras=args.max_loras,
        max_lora_rank=64,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_bytes=64 * 2**20 if device.type == "cpu" else None,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def section_pin(args, device: torch.device) -> dict:
    """What a new pinned host buffer costs against a reused one and a pageable one, for one
    adapter's bytes (issue #26: the loader pins every adapter's buffer), and whether pinning
    in one thread stalls another thread's kernel launches (the step loop's)."""
    if device.type != "cuda":
        print("\npin: CUDA only (skipped)", flush=True)
        return {}
    nbytes = int(args.pin_mib * 2**20)
    held: list[torch.Tensor] = []  # fresh: every buffer kept, so none comes from the cache

    def timed(make) -> list[float]:
        out = []
        for _ in range(args.pin_count):
            t0 = time.perf_counter()
            t = make()
            t[::4096].fill_(1)  # touch every page
            out.append((time.perf_counter() - t0) * 1e3)
            held.append(t)
        return out

    fresh = timed(lambda: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
    held.clear()
    gc.collect()
    reused = []
    for _ in range(args.pin_count):  # freed each time: the caching host allocator hands it back
        t0 = time.perf_counter()
        t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        t[::4096].fill_(1)
        reused.append((time.perf_counter() - t0) * 1e3)
        del t
    pageable = timed(lambda: torch.empty(nbytes, dtype=torch.uint8))
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d_pageable = []
    for t in held[:5]:  # host time of a "non_blocking" copy from pageable memory
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(t, non_blocking=True)
        h2d_pageable.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize(device)
    held.clear()
    gc.collect()

    x = torch.zeros(1, device=device)

    def launches(n: int = 2000) -> float:  # us per tiny kernel launch, host side
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1)
        return (time.perf_counter() - t0) / n * 1e6

    launches()
    alone = statistics.median(launches() for _ in range(5))
    stop = threading.Event()
    keep: list[torch.Tensor] = []

    def pin_loop() -> None:
        while not stop.is_set() and len(keep) < 4 * args.pin_count:
            keep.append(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))

    th = threading.Thread(target=pin_loop)
    th.start()
    beside = statistics.median(launches() for _ in range(5))
    stop.set()
    th.join()
    keep.clear()
    gc.collect()
    torch.cuda.synchronize(device)
    row = {
        "mib": args.pin_mib,
        "fresh_pinned_p50_ms": pct(fresh, 0.5),
        "fresh_pinned_gbs": nbytes / 1e6 / pct(fresh, 0.5),
        "reused_pinned_p50_ms": pct(reused, 0.5),
        "pageable_p50_ms": pct(pageable, 0.5),
        "h2d_from_pageable_host_ms": pct(h2d_pageable, 0.5),
        "launch_us_alone": alone,
        "launch_us_beside_pinning": beside,
    }
    print("\npinned host buffers, one adapter's bytes\n" + table([row], list(row)), flush=True)
    rows = [pin_variant(args, conf) for conf in PIN_CONFS]
    print(
        "\nfresh pinned buffers by allocator setting (own process each)\n"
        + table(rows, list(rows[0])),
        flush=True,
    )
    row["by_conf"] = rows
    return row


# PYTORCH_CUDA_ALLOC_CONF settings of torch's pinned host allocator: the default
# (cudaHostAlloc), and malloc + cudaHostRegister with the page faults spread over threads
# "engine": the default env, then the engine's own configure_pinned_memory() at run time
PIN_CONFS = ["", "engine", "pinned_use_cuda_host_register:True,pinned_num_register_threads:16"]
_PIN_PROBE = """
import json, sys, time, threading, torch
n, count, workers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if sys.argv[4] == "engine":
    from loraplex.engine.devices import configure_pinned_memory
    configure_pinned_memory()
torch.zeros(1, device="cuda")
keep = []
def one():
    t0 = time.perf_counter()
    t = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    t[::4096].fill_(1)
    keep.append(t)
    return (time.perf_counter() - t0) * 1e3
one()
single = sorted(one() for _ in range(count))[count // 2]
def loop():
    for _ in range(count):
        one()
ths = [threading.Thread(target=loop) for _ in range(workers)]
t0 = time.perf_counter()
for t in ths: t.start()
for t in ths: t.join()
wall = time.perf_counter() - t0
print(json.dumps({"single_p50_ms": single, "threads": workers,
                  "threads_gbs": n * count * workers / 1e9 / wall}))
"""


def pin_variant(args, conf: str) -> dict:
    """Fresh pinned buffers of one adapter's bytes under one allocator setting, in a process
    of its own (the setting is read at CUDA init): one thread's p50, and GB/s of 4 threads."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if conf and conf != "engine":
        env["PYTORCH_CUDA_ALLOC_CONF"] = conf
    n = int(args.pin_mib * 2**20)
    cmd = [sys.executable, "-c", _PIN_PROBE, str(n), str(args.pin_count), "4", conf or "-"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    row = {"conf": conf or "default"}
    if p.returncode != 0:
        return {**row, "error": p.stderr.strip().splitlines()[-1:]}
    return {**row, **json.loads(p.stdout.strip().splitlines()[-1])}


def section_single(args, runner: ModelRunner, root: Path) -> dict:
    cfg, device = runner.config, runner.device
    path = write_peft_adapter(root / "single", cfg, 16, targets=ALL7)
    st = path / "adapter_model.safetensors"
    reads, writes, totals, olds = [], [], [], []
    for i in range(args.reps + 1):
        t0 = time.perf_counter()
        w = runner.read_adapter(path)  # a new read each time: nothing is cached but the file
        t1 = time.perf_counter()
        runner.write_slot(i % runner.num_slots, w)
        sync(device)
        t2 = time.perf_counter()
        if i:  # the first one warms the allocators
            reads.append((t1 - t0) * 1e3)
            writes.append((t2 - t1) * 1e3)
            totals.append((t2 - t0) * 1e3)
    for _ in range(min(5, args.reps)):
        t0 = time.perf_counter()
        read_adapter_old(
            path, cfg, max_rank=64, dtype=runner.dtype, pin_memory=device.type == "cuda"
        )
        olds.append((time.perf_counter() - t0) * 1e3)
    nbytes = w.buffer.numel()
    row = {
        "model": args.model,
        "adapter_mib": nbytes / 2**20,
        "p50_ms": pct(totals, 0.5),
        "p99_ms": pct(totals, 0.99),
        "read_p50_ms": pct(reads, 0.5),
        "write_p50_ms": pct(writes, 0.5),
        "old_read_p50_ms": pct(olds, 0.5),
        "file_read_gbs": file_read_gbs(st),
        "h2d_gbs": h2d_gbs(device, nbytes) if device.type == "cuda" else float("nan"),
    }
    row["floor_ms"] = nbytes / 1e6 / row["file_read_gbs"] + (
        nbytes / 1e6 / row["h2d_gbs"] if device.type == "cuda" else 0.0
    )
    print("\none cold adapter: page cache -> GPU slot\n" + table([row], list(row)), flush=True)
    return row


# -- aggregate: loads/s with N workers ---------------------------------------------------------


def section_aggregate(args, runner: ModelRunner, root: Path) -> list[dict]:
    files = write_adapters(args, runner.config, "all7", args.files, root)
    rows = []
    for workers in [int(x) for x in args.workers.split(",")]:
        loader = AdapterLoader(
            runner.read_adapter, workers=workers, init_worker=loader_threads(workers)
        )
        refs = [AdapterRef(f"agg-{workers}-{i}", str(f)) for i, f in enumerate(files)]
        if args.cold:
            evict_from_page_cache(root)
        t0 = time.perf_counter()
        for ref in refs:
            loader.start(ref)
        while loader.num_loading:
            time.sleep(0.001)
            failed = loader.collect()
            if failed:
                raise RuntimeError(f"load failed: {failed[0]}")
        took = time.perf_counter() - t0
        loader.shutdown()
        nbytes = loader.stats.tier("disk").bytes
        rows.append(
            {"workers": workers, "cold": args.cold, "adapters": len(refs), "seconds": took,
             "adapters_s": len(refs) / took, "gb_s": nbytes / took / 1e9}
        )  # fmt: skip
        del loader
    print("\naggregate loads into host memory\n" + table(rows, list(rows[0])), flush=True)
    if args.cold:
        io_rows = [
            cold_read_rates(files, root, w) for w in [int(x) for x in args.workers.split(",")]
        ]
        print("\ncold reads of the same files\n" + table(io_rows, list(io_rows[0])), flush=True)
    return rows


def cold_read_rates(files: list[Path], root: Path, workers: int) -> dict:
    """GB/s of reading ``files`` from disk with ``workers`` threads, the page cache dropped
    before each way: mapped as the loader maps them (``open_safetensors``: MADV_WILLNEED,
    then every page touched), and plain ``readinto`` of 8 MiB chunks."""
    from concurrent.futures import ThreadPoolExecutor

    from loraplex.engine.lora.safetensors_file import open_safetensors

    def mapped(f: Path) -> int:
        data = open_safetensors(f).data
        data[::4096].sum()  # one byte of every page: each page faulted in
        return data.numel()

    def read(f: Path) -> int:
        buf = bytearray(8 << 20)
        n = 0
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(buf):
                n += k
        return n

    files = [f for d in files for f in sorted(Path(d).rglob("*.safetensors"))]
    row: dict = {"workers": workers}
    for name, fn in (("mmap_gb_s", mapped), ("read_8mib_gb_s", read)):
        evict_from_page_cache(root)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            total = sum(pool.map(fn, files))
        row[name] = total / (time.perf_counter() - t0) / 1e9
    return row


# -- engine: 1 .. 2,000 adapters ----------------------------------------------------------------


def write_adapters(args, cfg, setting: str, n_files: int, root: Path) -> list[Path]:
    out = []
    for i in range(n_files):
        d = root / setting / f"f{i}"
        if not d.exists():
            if setting == "all7":
                write_peft_adapter(d, cfg, 16, seed=i, targets=ALL7)
            else:  # S-LoRA's: q,k,v,o, ranks 8/16/32/64 mixed
                write_peft_adapter(d, cfg, (8, 16, 32, 64)[i % 4], seed=i, targets=QKVO)
        out.append(d)
    return out


class StoreRefs:
    """Bundles in a local object store, fetched by the real fetcher into a disk cache."""

    def __init__(self, root: Path) -> None:
        from prometheus_client import CollectorRegistry

        from loraplex.adapters.service import build_fetcher

        self.root = root
        self.store_dir = root / "store"
        self.fetcher = build_fetcher(
            store_url=f"file://{self.store_dir}",
            s3_endpoint_url=None,
            cache_dir=root / "disk-cache",
            cache_bytes=1 << 40,
            max_bytes=1 << 34,
            metrics_registry=CollectorRegistry(),
        )
        self.keys: dict[Path, tuple[str, str]] = {}

    def put(self, adapter_dir: Path) -> AdapterRef:
        from loraplex.adapters.bundle import pack
        from loraplex.adapters.storage import blob_key

        if adapter_dir not in self.keys:
            b = pack(adapter_dir, self.root / "bundle.tar")
            self.fetcher.store.put_file(blob_key(b.sha256), b.path)
            self.keys[adapter_dir] = (b.sha256, blob_key(b.sha256))
        sha, key = self.keys[adapter_dir]
        return AdapterRef.in_store(sha, key)

    def fetch(self, ref: AdapterRef):
        storage_key = ref.storage_key
        if storage_key is None:
            return Path(ref.uri)
        return self.fetcher.fetch_with_tier(ref.key, storage_key)


def run_case(
    args,
    runner: ModelRunner,
    refs: list[AdapterRef],
    fetch,
    host: bool,
    host_bytes: int | None = None,
    preload_refs: list[AdapterRef] | None = None,
) -> dict:
    cfg = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=runner.max_model_len,
        max_loras=args.max_loras,
        max_lora_rank=64,
        host_lora_bytes=host_bytes,
        adapter_load_workers=args.load_workers,
    )
    engine = LLMEngine(runner, cfg, fetch=fetch) if fetch else LLMEngine(runner, cfg)
    try:
        if host:
            preload(engine, refs if preload_refs is None else preload_refs)
        vocab = runner.config.vocab_size
        gen = torch.Generator().manual_seed(7)
        ids = torch.randint(3, vocab, (args.num_requests, args.prompt_len), generator=gen).tolist()
        counts = {t: v.count for t, v in engine.loader.stats.by_tier.items()}
        r = run_engine_case(args, engine, ids, refs)
        lat = {}
        for t, v in engine.loader.stats.by_tier.items():
            new = v.count - counts.get(t, 0)  # the loads of the run, not the preload
            if new:
                lat[t] = [x * 1e3 for x in list(v.recent)[-new:]]
        st = engine.stats()
        return {
            **r,
            "host_evictions": st.adapter_host_evictions,
            "latency_ms": {t: (pct(v, 0.5), pct(v, 0.99), len(v)) for t, v in lat.items()},
        }
    finally:
        engine.shutdown()
        del engine
        gc.collect()  # the engine holds its host tier (pinned on GPU) until collected


def section_engine(args, runner: ModelRunner, root: Path, bw_gbs: float) -> list[dict]:
    cfg = runner.config
    with tempfile.TemporaryDirectory(prefix="lpx-warm-") as tmp:  # compile, graphs, allocator
        warm = LLMEngine(runner, EngineConfig(max_model_len=runner.max_model_len, max_lora_rank=64))
        (f,) = write_adapters(args, cfg, "all7", 1, Path(tmp))
        ref = AdapterRef("warm", str(f))
        ids = [[5 + i] * args.prompt_len for i in range(4)]
        warm_up(warm, ids, [None, ref, None, ref])
        warm.shutdown()
        del warm
    if args.heap == "frozen":  # as the engine server's step loop does (loraplex/heap.py)
        freeze_heap()
    base = run_case(args, runner, [], None, False)
    print(f"\nno-adapter engine: {base['out_tok_s']:.0f} out tok/s", flush=True)
    rows = [{"setting": "base", "adapters": 0, "mode": "-", **base, "vs_base": 1.0}]
    rows[0]["bytes_bound"] = bytes_bound(base["seconds"], base["lora_step_bytes"], bw_gbs)
    host_cap = EngineConfig(host_lora_bytes=args.host_bytes).resolved_host_lora_bytes()
    for setting in args.settings.split(","):
        for n in [int(x) for x in args.adapters.split(",")]:
            files = write_adapters(args, cfg, setting, min(n, args.distinct_files), root)
            for mode in args.modes.split(","):
                if mode == "store" and n > args.store_max:
                    continue
                one = max(runner.read_adapter(f).host_bytes() for f in files[:4])
                host_bytes = args.host_bytes
                used = sorted(set(zipf_indices(n, args.num_requests, args.zipf, seed=args.seed)))
                held = len(used) if mode == "used" else n  # adapters preloaded
                if mode in ("host", "used") and held * one > host_cap:
                    if args.host_bytes is not None or held * one > 0.6 * host_memory_bytes():
                        continue  # the host tier cannot hold them all
                    host_bytes = int(held * one * 1.05)
                if mode == "store":
                    store = StoreRefs(root / f"store-{setting}-{n}")
                    refs = [store.put(files[i % len(files)]) for i in range(n)]
                    evict_from_page_cache(store.store_dir)
                    fetch = store.fetch
                else:
                    tag = f"{setting}-{n}-{mode}-{time.monotonic_ns()}"
                    refs = [AdapterRef(f"{tag}-{i}", str(files[i % len(files)])) for i in range(n)]
                    fetch = None
                    if mode == "disk":
                        evict_from_page_cache(root / setting)
                r = run_case(
                    args,
                    runner,
                    list(refs),
                    fetch,
                    mode in ("host", "used"),
                    host_bytes,
                    [refs[i] for i in used] if mode == "used" else None,
                )
                row = {"setting": setting, "adapters": n, "mode": mode, **r}
                row["vs_base"] = r["out_tok_s"] / base["out_tok_s"]
                row["bytes_bound"] = bytes_bound(base["seconds"], r["lora_step_bytes"], bw_gbs)
                row["loads_s"] = r["loads_in_run"] / r["seconds"] if r["loads_in_run"] else 0.0
                rows.append(row)
                lat = " ".join(
                    f"{t}: p50 {a:.1f} p99 {b:.1f} ms (n={c})"
                    for t, (a, b, c) in r["latency_ms"].items()
                )
                print(
                    f"{setting:5} N={n:5} {mode:5} {r['out_tok_s']:9.0f} tok/s "
                    f"x{row['vs_base']:.2f} of base (bytes bound x{row['bytes_bound']:.2f}: "
                    f"{r['adapters_per_step']:.1f} adapters, {r['adapter_gb_per_step']:.2f} GB "
                    f"a step), {r['loads_in_run']} loads in run "
                    f"({row['loads_s']:.1f}/s), {lat}",
                    flush=True,
                )
    by = {(r["setting"], r["adapters"], r["mode"]): r for r in rows}
    for r in rows:
        host = by.get((r["setting"], r["adapters"], "host"))
        if r["mode"] == "disk" and host:
            r["disk_vs_host"] = r["out_tok_s"] / host["out_tok_s"]
    cols = ["setting", "adapters", "mode", "requests", "seconds", "out_tok_s", "vs_base"]
    cols += ["bytes_bound", "adapters_per_step", "adapter_gb_per_step"]
    cols += ["distinct_used", "loads_in_run", "loads_s", "slot_evictions", "host_evictions"]
    print(f"\nengine (heap {args.heap})\n" + table(rows, cols), flush=True)
    gc.unfreeze()  # (a no-op when not frozen) the runner's cycles collectable again
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.smoke)
    sections = set(args.sections.split(","))
    result: dict = {"bench": "adapter_scale", "args": vars(args), "info": device_info(device)}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lpx-adapters-") as tmp:
        root = Path(tmp)
        if "cpu" in sections:
            result["cpu"] = section_cpu(args, device, root)
        if "pin" in sections:
            result["pin"] = section_pin(args, device)
        if "engine" in sections:  # measured before the runner takes the memory
            bw_gbs, bw_source = bound_bandwidth(device, args.bandwidth_gbs)
            result["copy_bandwidth_GBps"], result["copy_bandwidth_source"] = bw_gbs, bw_source
            print(f"engine bytes bound at {bw_gbs:.0f} GB/s, {bw_source}", flush=True)
        if sections & {"single", "aggregate", "engine"}:
            t0 = time.perf_counter()
            runner = make_runner(args, device)
            if args.host_pageable:
                runner.pin_adapters = False
            print(
                f"{args.model} on {device}: runner in {time.perf_counter() - t0:.1f}s", flush=True
            )
            if "single" in sections:
                result["single"] = section_single(args, runner, root)
            if "aggregate" in sections:
                result["aggregate"] = section_aggregate(args, runner, root)
            if "engine" in sections:
                result["engine"] = section_engine(args, runner, root, bw_gbs)
    result["seconds"] = time.perf_counter() - t_start
    print(f"\ntotal {result['seconds']:.0f}s", flush=True)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
