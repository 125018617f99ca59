"""Launch configurations measured on the GPU the engine runs on, kept per GPU model.

A :class:`LaunchConfigs` maps ``(op, shape key)`` to the kernel config that measured fastest
(a dict of block sizes, splits, warps, stages). The runner's warm-up fills the missing
entries with :meth:`LaunchConfigs.sweep` (each candidate replayed a few times from a CUDA
graph, timed with CUDA events) and saves the table as JSON in the cache directory, one file
per GPU model and Triton version (``torch.cuda.get_device_name`` + ``triton.__version__``):
an H100 and an H200 each get their own, and a second start on the same model reads it
instead of sweeping again. Ops ask :meth:`get` and fall back to their defaults (sized from
the device's properties) when there is no entry: on CPU, in the interpreter, or with no
cache directory set.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("loraplex.engine.tuning")
Config = dict[str, Any]


def device_key(device: torch.device) -> str:
    from loraplex.engine.kernels._triton import HAVE_TRITON, triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    version = triton.__version__ if HAVE_TRITON else "none"
    return f"{name} triton {version}"


class LaunchConfigs:
    def __init__(self, key: str, path: Path | None = None) -> None:
        self.key = key
        self.path = path
        self.table: dict[str, dict[str, Config]] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("device") == key:
                    self.table = data.get("configs", {})
            except (OSError, ValueError) as exc:
                log.warning("kernel config cache %s unreadable (%s): starting empty", path, exc)

    @classmethod
    def for_device(cls, device: torch.device, cache_dir: Path | None) -> LaunchConfigs:
        key = device_key(device)
        if cache_dir is None:
            return cls(key)
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", key).strip("-")
        return cls(key, Path(cache_dir) / f"{slug}.json")

    def get(self, op: str, shape: str) -> Config | None:
        return self.table.get(op, {}).get(shape)

    def put(self, op: str, shape: str, config: Config) -> None:
        self.table.setdefault(op, {})[shape] = dict(config)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"device": self.key, "configs": self.table}, indent=1))
        tmp.replace(self.path)

    def sweep(
        self,
        op: str,
        shape: str,
        candidates: Sequence[Config],
        run: Callable[[Config], object],
        reps: int = 10,
        margin: float = 0.0,
    ) -> tuple[Config, dict[str, float]]:
        """Time ``run(config)`` for each candidate (CUDA events, median of ``reps`` after a
        compile-and-warm run); the fastest becomes the entry. Candidates that fail to compile
        or launch (too much shared memory for this part) are skipped. ``margin``: the first
        candidate (the defaults) stays unless another is faster by more than this fraction,
        so that noise between equals does not pick a config. -> (best, times in ms by
        candidate)."""
        times: dict[str, float] = {}
        for cfg in candidates:
            try:
                times[json.dumps(cfg, sort_keys=True)] = time_ms(lambda cfg=cfg: run(cfg), reps)
            except Exception as exc:
                log.debug("%s %s: %s failed: %s", op, shape, cfg, exc)
        best = pick(candidates, times, margin)
        if best is None:
            raise RuntimeError(f"{op} {shape}: no candidate config ran")
        self.put(op, shape, best)
        return best, times


def pick(candidates: Sequence[Config], times: dict[str, float], margin: float) -> Config | None:
    """The fastest of ``candidates`` by ``times`` (ms, keyed by each config's sorted JSON;
    a candidate without a time failed), unless the first (the defaults) is within ``margin``
    of it. None: none ran."""
    ran = [
        (times[k], i)
        for i, c in enumerate(candidates)
        if (k := json.dumps(c, sort_keys=True)) in times
    ]
    if not ran:
        return None
    best_ms, best = min(ran)
    first = json.dumps(candidates[0], sort_keys=True)
    if first in times and best_ms > times[first] * (1 - margin):
        return candidates[0]
    return candidates[best]


# The decode graphs' LoRA launch configs the warm-up tries (``DecodeGraphs.tune_lora``), one
# pair of overrides of lora_shrink / lora_expand for every projection group of the step; the
# first, no override, is the kernels' own rules. From the H100 sweeps of the decode step
# (benchmarks/sweep_decode_lora.py, docs/benchmarks.md): the per-token expand's runs of
# [256, 16] B tiles a program and its warps, the shrink's K slice per program, and the two
# together; the segment path's K slices and expand tiles.
_RUN = {"block_n": 256, "one_tile": True}
LORA_DECODE_CANDIDATES: dict[str, list[Config]] = {
    "token": [
        {},
        {"expand": {**_RUN, "n_per": 256, "num_warps": 8}},
        {"expand": {**_RUN, "n_per": 512, "num_warps": 8}},
        {"expand": {**_RUN, "n_per": 1024, "num_warps": 4}},
        {"expand": {**_RUN, "n_per": 2048, "num_warps": 4}},
        {"shrink": {"k_per": 512}},
        {"shrink": {"k_per": 1024}},
        {"shrink": {"k_per": 2048}},
        {"expand": {**_RUN, "n_per": 512, "num_warps": 8}, "shrink": {"k_per": 1024}},
        {"expand": {**_RUN, "n_per": 1024, "num_warps": 4}, "shrink": {"k_per": 2048}},
    ],
    "segment": [
        {},
        {"shrink": {"k_per": 2048}},
        {"shrink": {"max_split": 8}},
        {"expand": {"block_n": 256, "n_per": 1024, "num_warps": 4}},
        {"expand": {"block_n": 128, "n_per": 512}},
        {"expand": {"block_n": 256, "n_per": 1024, "num_warps": 4}, "shrink": {"k_per": 2048}},
    ],
}


def time_ms(fn: Callable[[], object], reps: int = 10) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream, replayed from a CUDA graph as
    the engine runs its kernels (one warm run first). Launched from Python one by one, a
    Triton kernel costs ~35 us of host time, more than a decode-sized GEMM takes on the GPU:
    the first H200 sweep timed launches (4096x4096 at 16 rows: 37 us a weight, against 4 us
    of bytes) and picked configs slower than the defaults in a graph. Falls back to timing
    the launches when ``fn`` cannot be captured."""
    fn()
    torch.cuda.synchronize()
    graph = _capture(fn)
    run = graph.replay if graph is not None else fn
    run()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    return ms[len(ms) // 2]


def _capture(fn: Callable[[], object]) -> torch.cuda.CUDAGraph | None:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            fn()  # capture wants the kernels already compiled and memory already cached
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph
    except Exception as exc:  # any capture failure: time the launches instead
        torch.cuda.synchronize()
        log.debug("tuning: capture failed (%s), timing launches", exc)
        return None
