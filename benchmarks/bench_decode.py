"""Decode step of the engine's model runner against its bytes floor.

One command: ``PYTHONPATH=. python benchmarks/bench_decode.py`` (CUDA; ``--smoke`` runs
``dummy:tiny`` on the CPU). For ``dummy:llama3-8b`` in bf16, every sequence at context 512,
it times steady-state decode steps through ``ModelRunner.execute`` (CUDA graphs on) for
batch 1/8/32/64/128 and three adapter mixes:

- ``base``: no adapter;
- ``one``: every sequence uses the same rank-16 adapter;
- ``distinct``: every sequence its own rank-16 adapter (N = batch distinct adapters);
- ``sharedN`` (e.g. ``shared132``): N distinct adapters, sequence i on adapter i % N.

``--force-segment`` times the adapter mixes again with every LoRA decode graph on the segment
kernels (``DecodeGraphs.force_segment``, graphs recaptured), rows labelled ``-seg``;
``--force-token`` the same on the per-token kernels (rows ``-tok``).

Adapters are PEFT directories with random weights read by the runner's own reader; slot s
holds weight file ``s % --weight-files`` (4): each slot is its own memory, so the bytes a step
reads are those of N adapters, only their values repeat.

Two times per case:

- ``gpu_ms``: the captured decode graph's replay plus the LM head, back to back under CUDA
  events (device time of a step; host work excluded);
- ``step_ms``: ``runner.execute(batch)`` followed by a device sync, median wall clock: what
  the engine's loop pays per step (host input building, copies, replay, LM head).

The floor is (base weights + the batch's distinct adapter weights + the KV read) over the
device-to-device copy bandwidth measured in the same run (read + write bytes counted).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    adapter_bytes,
    base_step_bytes,
    copy_bandwidth,
    device_info,
    kernel_table,
    kv_read_bytes,
    median_synced,
    pick_device,
    table,
    time_once,
    write_json,
    write_peft_adapter,
)

from loraplex.engine.batch import ScheduledBatch, SeqChunk
from loraplex.engine.model_runner import ModelRunner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dummy:llama3-8b")
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-lora-rank", type=int, default=None, help="the pool's (default: --rank)")
    p.add_argument("--modes", default="base,one,distinct")
    p.add_argument("--steps", type=int, default=30, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--weight-files", type=int, default=4, help="distinct random adapter files")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--profile", default=None, help="dir: torch.profiler of the batch-32 case")
    p.add_argument("--profile-batch", type=int, default=32, help="--profile's batch")
    p.add_argument(
        "--force-segment", action="store_true",
        help="also time the adapter mixes with every LoRA graph on the segment kernels",
    )  # fmt: skip
    p.add_argument(
        "--force-token", action="store_true",
        help="also time the adapter mixes with every LoRA graph on the per-token kernels",
    )  # fmt: skip
    p.add_argument(
        "--compare-in-line",
        action="store_true",
        help="also time the adapter mixes with LoRA in line (no side stream; graphs recaptured)",
    )
    p.add_argument("--host-profile", default=None, help="dir: cProfile of execute, batch 32")
    p.add_argument(
        "--quantization", default=None, choices=["fp8"], help="FP8 base weights (at load)"
    )
    p.add_argument(
        "--fp8-w8a8-min-tokens",
        type=int,
        default=1,
        help="FP8: FP8 activations from this step size",
    )
    p.add_argument("--kernel-config-dir", default=None, help="per-GPU launch-config cache")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8"],
        help="fp8: the KV cache in e4m3 (scale 1)",
    )
    p.add_argument("--smoke", action="store_true", help="dummy:tiny, tiny counts (CPU)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batches, args.context = "dummy:tiny", "1,3", 40
        args.steps, args.warmup = 3, 1
    return args


def build_runner(args, device: torch.device, max_batch: int, num_slots: int) -> ModelRunner:
    per_seq = -(-(args.context + 1) // args.block_size)
    return ModelRunner(
        args.model,
        device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        block_size=args.block_size,
        max_num_seqs=max_batch,
        max_model_len=per_seq * args.block_size,
        max_loras=num_slots,
        max_lora_rank=args.max_lora_rank or args.rank,
        num_blocks=max_batch * per_seq + 1,
        seed=0,
        quantization=args.quantization,
        fp8_w8a8_min_tokens=args.fp8_w8a8_min_tokens,
        kernel_config_dir=Path(args.kernel_config_dir) if args.kernel_config_dir else None,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def shared_n(mode: str) -> int:
    """``sharedN`` -> N (0 for the other modes)."""
    return int(mode[len("shared") :]) if mode.startswith("shared") else 0


def mode_slots(mode: str, b: int) -> list[int]:
    if mode.startswith("shared"):
        return [i % shared_n(mode) for i in range(b)]
    return {"base": [-1] * b, "one": [0] * b, "distinct": list(range(b))}[mode]


def decode_batch(batch: int, context: int, per_seq: int, slots: list[int]) -> ScheduledBatch:
    """``batch`` sequences at ``context`` tokens each: the step computes position context-1.

    Block tables are disjoint (block 0 is left unused)."""
    gen = torch.Generator().manual_seed(batch)
    toks = torch.randint(3, 200, (batch,), generator=gen).tolist()
    chunks = [
        SeqChunk(
            seq_id=i,
            token_ids=[toks[i]],
            start_pos=context - 1,
            block_table=list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)),
            adapter_slot=slots[i],
            sample=True,
        )
        for i in range(batch)
    ]
    return ScheduledBatch(chunks)


def gpu_step_seconds(runner: ModelRunner, batch: ScheduledBatch, with_lora: bool, n: int):
    """Device time of one step: the decode graph's replay + LM head, ``n`` back to back."""
    graphs = runner.graphs
    b = len(batch.chunks)
    if graphs is None:
        return None
    runner.execute(batch)  # fills the static buffers for this batch
    g, out = graphs.last_replayed  # the graph execute() picked for this batch

    def run() -> None:
        for _ in range(n):
            g.replay()
            runner.model.logits(out[:b])

    run()
    return time_once(run, runner.device) / n


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.smoke)
    batches = [int(x) for x in args.batches.split(",")]
    modes = args.modes.split(",")
    max_batch = max(batches)
    num_slots = max([max_batch if "distinct" in modes else 1, *map(shared_n, modes)])
    bw = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    print(f"copy bandwidth (read+write): {bw / 1e9:.0f} GB/s", flush=True)

    runner = build_runner(args, device, max_batch, num_slots)
    cfg = runner.config
    elem = torch.empty((), dtype=runner.dtype).element_size()
    per_seq = -(-(args.context + 1) // args.block_size)
    print(
        f"{args.model}: {runner.loaded.weights.nbytes() / 2**30:.2f} GiB weights, "
        f"{runner.num_blocks} KV blocks, {num_slots} LoRA slots, "
        f"graphs={'on' if runner.graphs is not None else 'off'}",
        flush=True,
    )
    with torch.inference_mode():
        for k_cache, v_cache in runner.kv_caches:  # random KV (never time on zeros)
            for c in (k_cache, v_cache):  # (FP8 caches have no normal_)
                c.copy_(torch.randn(c.shape, device=c.device, dtype=runner.dtype))
        with tempfile.TemporaryDirectory(prefix="lpx-decode-") as tmp:
            files = [
                runner.read_adapter(write_peft_adapter(Path(tmp) / f"w{i}", cfg, args.rank, seed=i))
                for i in range(min(args.weight_files, num_slots))
            ]
        for s in range(num_slots):
            runner.write_slot(s, files[s % len(files)])
        del files
    a_bytes = adapter_bytes(cfg, args.rank, elem)
    w_bytes = runner.loaded.weights.nbytes()

    def measure(b: int, mode: str, label: str) -> dict:
        slots = mode_slots(mode, b)
        n_adapters = len({s for s in slots if s >= 0})
        batch = decode_batch(b, args.context, per_seq, slots)
        for _ in range(args.warmup):
            runner.execute(batch)
        step = median_synced(lambda batch=batch: runner.execute(batch), device, args.steps)
        gpu = gpu_step_seconds(runner, batch, n_adapters > 0, args.steps)
        floor_bytes = (
            base_step_bytes(cfg, w_bytes, b, elem)
            + n_adapters * a_bytes
            + kv_read_bytes(cfg, b, args.context, runner.kv_caches[0][0].element_size())
        )
        floor = floor_bytes / bw
        row = {
            "batch": b,
            "mode": label,
            "adapters": n_adapters,
            "floor_ms": floor * 1e3,
            "gpu_ms": gpu * 1e3 if gpu is not None else float("nan"),
            "gpu/floor": gpu / floor if gpu is not None else float("nan"),
            "step_ms": step * 1e3,
            "step/floor": step / floor,
            "floor_GB": floor_bytes / 1e9,
        }
        print(table([row], list(row)), flush=True)
        return row

    rows = [measure(b, mode, mode) for b in batches for mode in modes]
    if args.host_profile:
        b = 32 if 32 in batches else max(batches)
        slots = list(range(b)) if "distinct" in modes else [-1] * b
        text = host_profile(runner, decode_batch(b, args.context, per_seq, slots))
        Path(args.host_profile).mkdir(parents=True, exist_ok=True)
        (Path(args.host_profile) / "decode_host_profile.txt").write_text(text)
    forced = [("seg", "force_segment")] if args.force_segment else []
    forced += [("tok", "force_token")] if args.force_token else []
    for suffix, switch in forced:
        if runner.graphs is None:
            break
        setattr(runner.graphs, switch, True)
        runner.graphs.capture()
        for b in batches:
            for mode in modes:
                if mode != "base":
                    row = measure(b, mode, f"{mode}-{suffix}")
                    beside = next(r for r in rows if r["batch"] == b and r["mode"] == mode)
                    beside[f"gpu/{suffix}"] = beside["gpu_ms"] / row["gpu_ms"]
                    rows.append(row)
        setattr(runner.graphs, switch, False)
        runner.graphs.capture()
    if args.compare_in_line and runner.graphs is not None:
        # the baseline of the side-stream LoRA: every LoRA kernel in line after its GEMM
        runner.model.side_stream = None
        runner.graphs.capture()
        for b in batches:
            for mode in modes:
                if mode == "base":
                    continue
                row = measure(b, mode, mode + "-in-line")
                beside = next(r for r in rows if r["batch"] == b and r["mode"] == mode)
                beside["gpu/in-line"] = beside["gpu_ms"] / row["gpu_ms"]
                rows.append(row)

    # each mode against base at the same batch (same run)
    base = {r["batch"]: r for r in rows if r["mode"] == "base"}
    for r in rows:
        if r["batch"] in base:
            r["step/base"] = r["step_ms"] / base[r["batch"]]["step_ms"]
    cols = ["batch", "mode", "adapters", "floor_ms", "gpu_ms", "gpu/floor", "step_ms"]
    cols += ["step/floor", "step/base"] + (["gpu/in-line"] if args.compare_in_line else [])
    cols += [f"gpu/{suffix}" for suffix, _ in forced]
    print("\n" + table(rows, cols))
    result = {
        "bench": "decode",
        "args": vars(args),
        "info": device_info(device),
        "copy_bandwidth_GBps": bw / 1e9,
        "weights_bytes": w_bytes,
        "adapter_bytes": a_bytes,
        "rows": rows,
        "median_step_over_floor": statistics.median(r["step/floor"] for r in rows),
    }
    write_json(args.json, result)
    if args.profile:
        b = args.profile_batch if args.profile_batch in batches else max(batches)
        texts = []
        for mode in [m for m in modes if m != "base"]:
            batch = decode_batch(b, args.context, per_seq, mode_slots(mode, b))
            texts.append(f"==== batch {b}, {mode}\n" + profile_steps(runner, batch))
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        (Path(args.profile) / "decode_profile.txt").write_text("\n\n".join(texts))
        print(f"decode profiles written to {args.profile}", flush=True)
    return result


def host_profile(runner: ModelRunner, batch: ScheduledBatch, steps: int = 30) -> str:
    """cProfile of ``execute`` + sync: where the host's part of a step goes."""
    import cProfile
    import io
    import pstats

    for _ in range(3):
        runner.execute(batch)
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        runner.execute(batch)
        sync()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats(35)
    stats.sort_stats("tottime").print_stats(20)
    return f"{steps} steps of batch {len(batch.chunks)}\n" + out.getvalue()


def profile_steps(runner: ModelRunner, batch: ScheduledBatch, steps: int = 5) -> str:
    """torch.profiler over a few synced ``execute`` steps -> op table, and per kernel name and
    grid the time per step (from the trace), largest first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for _ in range(3):
        runner.execute(batch)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            runner.execute(batch).argmax(dim=1).tolist()  # the sampler's sync, not a big copy
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=30)
    text += "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return text + "\n" + kernel_table(prof, steps)


if __name__ == "__main__":
    main()
