"""Shared pieces of the engine-level benchmarks: bandwidth, byte counts, adapters, output.

Every benchmark reports ratios against a baseline measured in the same run; the bytes floor
uses :func:`copy_bandwidth`, a large device-to-device copy timed here (bytes read + written).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraplex.engine.lora.weights import GROUPS, LoraModule, module_dims
from loraplex.engine.model.config import ModelConfig

ALL_TARGETS = tuple(m for mods in GROUPS.values() for m in mods)
GiB = 2**30


# ---- timing and bandwidth ------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = GiB, reps: int = 20) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written.

    Median of ``reps`` copies timed with CUDA events after a warm-up (wall clock on CPU)."""
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
    bufs[0].random_(0, 255)

    def copy() -> None:
        bufs[1].copy_(bufs[0])

    for _ in range(3):
        copy()
    times = [time_once(copy, device) for _ in range(reps)]
    bufs.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


NOMINAL_BANDWIDTH_GBS = 4200.0  # the bytes bound's bandwidth off CUDA (a nominal H200 rate)


def bound_bandwidth(device: torch.device, override_gbs: float | None) -> tuple[float, str]:
    """GB/s for :func:`bytes_bound` and where it comes from: ``override_gbs``
    (``--bandwidth-gbs``), else :func:`copy_bandwidth` measured on CUDA, else nominal."""
    if override_gbs is not None:
        return override_gbs, "--bandwidth-gbs"
    if device.type == "cuda":
        return copy_bandwidth(device) / 1e9, "measured (device copy, read + write)"
    return NOMINAL_BANDWIDTH_GBS, "nominal (not measured off CUDA)"


def bytes_bound(base_seconds: float, lora_bytes: int, bandwidth_gbs: float) -> float:
    """The most an adapter case can reach of the no-adapter case's throughput when each
    step also reads its distinct adapters' weights (``lora_bytes``, summed over the run's
    steps: ``EngineStats.lora_step_bytes``): ``T0 / (T0 + lora_bytes / BW)``, ``T0`` the
    no-adapter case's seconds for the same workload."""
    return base_seconds / (base_seconds + lora_bytes / (bandwidth_gbs * 1e9))


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on ``device`` (CUDA events; wall clock on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def graph_median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph (compiled and warmed first,
    captured after a run on a side stream), over ``reps`` replays timed one by one."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    times = [time_once(g.replay, device) for _ in range(reps)]
    del g
    return statistics.median(times) * 1e3


def wall_per_call(fn: Callable[[], object], device: torch.device, n: int) -> float:
    """Seconds per call of ``fn`` run ``n`` times back to back, synchronizing once at the end
    (so the host may run ahead of the device: max(host time, device time) per call)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def median_synced(fn: Callable[[], object], device: torch.device, n: int) -> float:
    """Median wall seconds of ``fn`` followed by a device sync (what a step loop that reads
    its result every step, as the engine's sampler does, sees)."""
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


# ---- byte counts for the floor -------------------------------------------------------------


def kernel_table(prof, calls: int, rows: int = 25) -> str:
    """From a finished ``torch.profiler`` run over ``calls`` calls: per kernel name and grid,
    the device time per call, the launches per call and the mean time of one, largest first
    (from the trace, where each kernel carries its grid)."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    by: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.get("cat") == "kernel":
            k = (e["name"][:60], str(e.get("args", {}).get("grid")))
            by.setdefault(k, []).append(e["dur"])
    total = sum(sum(d) for d in by.values()) / calls
    text = f"kernels {total:.1f} us a call; (name, grid): us a call, calls, mean us\n"
    for (name, grid), durs in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        text += (
            f"{sum(durs) / calls:9.1f} {len(durs) // calls:5d} {sum(durs) / len(durs):8.2f}"
            f"  {name} {grid}\n"
        )
    return text


def adapter_bytes(cfg: ModelConfig, rank: int, elem: int, targets=ALL_TARGETS) -> int:
    """Bytes of one adapter's A and B (what a decode step must read per distinct adapter)."""
    dims = module_dims(cfg)
    per_layer = sum(rank * (dims[m][0] + dims[m][1]) for m in targets)
    return per_layer * cfg.num_layers * elem


def base_step_bytes(cfg: ModelConfig, weights_nbytes: int, batch: int, elem: int) -> int:
    """Weight bytes a decode step reads: every weight except the embedding table, of which
    only ``batch`` rows are gathered (when tied, the table is read in full as the LM head)."""
    embed = cfg.vocab_size * cfg.hidden_size * elem
    if cfg.tie_word_embeddings:
        return weights_nbytes
    return weights_nbytes - embed + batch * cfg.hidden_size * elem


def kv_read_bytes(cfg: ModelConfig, batch: int, context: int, elem: int) -> int:
    """K and V of ``context`` positions for ``batch`` sequences, every layer."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem * context * batch


# ---- random adapters -----------------------------------------------------------------------


def random_lora_modules(
    cfg: ModelConfig,
    rank: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    seed: int = 0,
    targets=ALL_TARGETS,
) -> dict[tuple[int, str], LoraModule]:
    """A rank-``rank`` adapter on every target of every layer: ``(layer, module) -> (A, B)``;
    an expert module (``experts.<proj>``, MoE) on every expert, keyed ``layer * E + expert``.

    A has unit gain (std 1/sqrt(in)); B (scale folded) moves the output by about 0.1x."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dims = module_dims(cfg)
    mods = {}
    for layer in range(cfg.num_layers):
        for m in targets:
            in_f, out_f = dims[m]
            experts = cfg.num_experts if m.startswith("experts.") else 0
            for row in range(layer * experts, (layer + 1) * experts) if experts else [layer]:
                a = torch.randn(rank, in_f, generator=gen, device=device) / math.sqrt(in_f)
                b = torch.randn(out_f, rank, generator=gen, device=device) * (0.1 / math.sqrt(rank))
                mods[(row, m)] = LoraModule(a.to(dtype), b.to(dtype))
    return mods


def write_peft_adapter(
    out: Path,
    cfg: ModelConfig,
    rank: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    targets: tuple[str, ...] | None = None,
) -> Path:
    """A PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) with
    random A and B, written straight from tensors (no model needed). lora_alpha = rank.
    ``targets``: default every module the model's family adapts (Phi-3's fused ones)."""
    from safetensors.torch import save_file

    targets = targets or cfg.adapter_modules
    mods = random_lora_modules(cfg, rank, dtype=dtype, seed=seed, targets=targets)
    tensors = {}
    for (layer, m), mod in mods.items():
        parent = "self_attn" if m in (*GROUPS["qkv"], *GROUPS["o"], "qkv_proj") else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{parent}.{m}"
        if m.startswith("experts."):  # PEFT's per-expert modules
            layer, e = divmod(layer, cfg.num_experts)
            prefix = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{m[8:]}"
        tensors[f"{prefix}.lora_A.weight"] = mod.a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = mod.b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": list(dict.fromkeys(t.removeprefix("experts.") for t in targets)),
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def zipf_indices(n_items: int, n_draws: int, s: float = 1.0, seed: int = 0) -> list[int]:
    """``n_draws`` indices in ``[0, n_items)``, P(k) proportional to 1 / (k+1)^s."""
    gen = torch.Generator().manual_seed(seed)
    w = 1.0 / torch.arange(1, n_items + 1, dtype=torch.float64) ** s
    return torch.multinomial(w, n_draws, replacement=True, generator=gen).tolist()


def hf_llama_config(cfg: ModelConfig):
    """The transformers ``LlamaConfig`` of an engine preset (for the HF baseline)."""
    from transformers import LlamaConfig

    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rs = cfg.rope_scaling
    if rs.kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids) or None,
    )


# ---- output --------------------------------------------------------------------------------


def device_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / GiB, 1)
        )
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def write_json(path: str | None, result: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))


def table(rows: list[dict], cols: list[str]) -> str:
    """A plain fixed-width table of ``rows`` (dicts) in column order ``cols``."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def pick_device(smoke: bool) -> torch.device:
    if smoke and not os.environ.get("LORAPLEX_BENCH_SMOKE_CUDA"):
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class StepEvents:
    """How busy the GPU is while an engine steps, from CUDA events (no profiler, so the host
    runs at its own speed): an event before each step's first launch (the runner's
    ``run``) and one after its last (the sampler's launch). The GPU is busy with a step
    from the first event to the second; the fraction is the sum of those spans over the
    window, from the first step's start to the last one's end. Install on an engine with
    :meth:`attach`; ``start()`` and ``stop()`` bracket the window; CPU runs report nothing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._on = False
        self._pairs: list[list] = []
        self.fraction = float("nan")
        self.busy_ms = float("nan")
        self.span_ms = float("nan")
        self.breakdown: dict = {}

    def attach(self, engine) -> None:  # type: ignore[no-untyped-def]
        if self.device.type != "cuda":
            return
        runner, sampler = engine.runner, engine.sampler
        run, sample = runner.run, sampler.sample

        def timed_run(batch, prev_tokens=None):  # type: ignore[no-untyped-def]
            if not self._on:
                return run(batch, prev_tokens)
            t0 = time.perf_counter()
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            # [start event, end event, host: run entry, run exit, sample exit, eager]
            eager = batch.num_tokens != len(batch.chunks)  # a prefill chunk: no decode graph
            self._pairs.append([ev, None, t0, None, None, eager])
            out = run(batch, prev_tokens)
            self._pairs[-1][3] = time.perf_counter()
            return out

        def timed_sample(logits, rows, masks=None):  # type: ignore[no-untyped-def]
            out = sample(logits, rows, masks)
            if self._on and self._pairs and self._pairs[-1][1] is None:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self._pairs[-1][1] = ev
                self._pairs[-1][4] = time.perf_counter()
            return out

        runner.run, sampler.sample = timed_run, timed_sample

    def start(self) -> None:
        self._on = self.device.type == "cuda"
        self._pairs = []

    def stop(self) -> None:
        if not self._on:
            return
        self._on = False
        torch.cuda.synchronize(self.device)
        steps = [s for s in self._pairs if s[1] is not None]
        if not steps:
            return
        self.busy_ms = sum(s[0].elapsed_time(s[1]) for s in steps)
        self.span_ms = steps[0][0].elapsed_time(steps[-1][1])
        self.fraction = self.busy_ms / self.span_ms if self.span_ms > 0 else float("nan")
        # Where the idle time falls: the gap before each step, by the step's kind (eager:
        # it has a prefill chunk; graph: decode only), and the host's launch time for it
        # (run + sample calls) against its GPU time.
        by: dict[str, list[float]] = {
            "eager": [0, 0.0, 0.0, 0.0, 0.0],
            "graph": [0, 0.0, 0.0, 0.0, 0.0],
        }
        for prev, s in itertools.pairwise(steps):
            k = by["eager" if s[5] else "graph"]
            k[0] += 1
            k[1] += max(0.0, prev[1].elapsed_time(s[0]))  # GPU idle before this step
            k[2] += s[0].elapsed_time(s[1])  # GPU span
            k[3] += (s[4] - s[2]) * 1e3  # host launch time
            k[4] += (s[2] - prev[4]) * 1e3  # host time between steps (read-back, schedule)
        self.breakdown = {
            kind: {"steps": n, "gap_ms": g / n, "gpu_ms": b / n, "launch_ms": h / n,
                   "between_ms": w / n} if n else {"steps": 0}
            for kind, (n, g, b, h, w) in by.items()
        }  # fmt: skip
