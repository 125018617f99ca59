"""Decode-step LoRA variants on one runner: where the side-stream LoRA time goes.

One command (CUDA): ``PYTHONPATH=. python benchmarks/sweep_decode_lora.py``. Builds
``dummy:llama3-8b`` (bf16, graphs up to batch 32, 32 slots of rank-16 adapters, KV at
context 512) once; for each variant it recaptures the decode graphs and times the
batch-32 step (graph replay + LM head, device time as in bench_decode.py) with base only,
and 32 distinct adapters (``--batch``, ``--adapters``, ``--zipf``, ``--slots``: other mixes,
e.g. the throughput benchmark's ~250-sequence steps over 32 Zipf adapters on 128 slots).
Variants: LoRA in line, and SGMV launch options (``config=`` of ``lora_shrink`` /
``lora_expand``, applied by wrapping the module functions the model calls).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import build_runner, decode_batch, gpu_step_seconds
from common import (
    adapter_bytes,
    base_step_bytes,
    copy_bandwidth,
    kv_read_bytes,
    write_peft_adapter,
)

# the modules (engine.kernels re-exports functions of the same names)
S = importlib.import_module("loraplex.engine.kernels.lora_shrink")
E = importlib.import_module("loraplex.engine.kernels.lora_expand")
ORIG_S, ORIG_E = S.lora_shrink, E.lora_expand

VARIANTS: list[tuple[str, dict]] = [
    ("default", {}),
    ("in line", {"in_line": True}),
    ("expand loop", {"expand": {"one_tile": False}}),
    # beside the GEMMs the expand takes one [256, 16] tile of B per program (8 warps), the
    # best at batch 32 on the H100; at batch 256 that is ~43,000 programs a layer, each a
    # chain of dependent loads (slot, rank and pages, B): runs of tiles per program
    ("expand 2 tiles a program", {"expand": {"block_n": 256, "n_per": 512, "one_tile": True}}),
    ("expand 4 tiles a program", {"expand": {"block_n": 256, "n_per": 1024, "one_tile": True}}),
    ("expand 8 tiles a program", {"expand": {"block_n": 256, "n_per": 2048, "one_tile": True}}),
    (
        "expand 4 tiles, 4 warps",
        {"expand": {"block_n": 256, "n_per": 1024, "one_tile": True, "num_warps": 4}},
    ),
    ("expand 1 tile, 4 warps", {"expand": {"num_warps": 4}}),
    ("shrink max_split 8", {"shrink": {"max_split": 8}}),
    # 96 registers against 113 on sm_90: 5 programs an SM against 4 (kernel_resources.py)
    ("shrink block_k 128", {"shrink": {"block_k": 128}}),
    ("shrink k_per 1024", {"shrink": {"k_per": 1024}}),
    ("shrink k_per 2048", {"shrink": {"k_per": 2048}}),
    ("default again", {}),
]


def with_config(orig, cfg: dict | None):
    """``orig`` (lora_shrink / lora_expand) with ``cfg`` as its tuning override."""
    if not cfg:
        return orig
    return lambda *args, config=None, **kw: orig(*args, config=dict(cfg), **kw)


def apply(runner, side, v: dict) -> None:
    S.lora_shrink = with_config(ORIG_S, v.get("shrink"))
    E.lora_expand = with_config(ORIG_E, v.get("expand"))
    if v.get("in_line"):
        runner.model.side_stream = None
    elif "priority" in v:
        runner.model.side_stream = torch.cuda.Stream(runner.device, priority=v["priority"])
    else:
        runner.model.side_stream = side
    runner.graphs.capture()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=0, help="distinct adapters (0 = batch)")
    ap.add_argument("--zipf", type=float, default=0.0, help="adapter popularity (0 = uniform)")
    ap.add_argument("--slots", type=int, default=0, help="GPU LoRA slots (0 = adapters)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--max-lora-rank", type=int, default=16, help="the pool's (engine: 64)")
    ap.add_argument(
        "--profile", action="store_true", help="per-kernel device time of the default's steps"
    )
    args = ap.parse_args()
    n_ad = args.adapters or args.batch
    n_slots = max(args.slots, n_ad)
    ns = argparse.Namespace(
        model="dummy:llama3-8b", context=args.context, block_size=16, rank=16,
        max_lora_rank=args.max_lora_rank, quantization=None, fp8_w8a8_min_tokens=1,
        kernel_config_dir=None,
    )  # fmt: skip
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev, nbytes=1 << 30)
    b = args.batch
    runner = build_runner(ns, dev, b, n_slots)
    cfg = runner.config
    per_seq = -(-(ns.context + 1) // ns.block_size)
    with torch.inference_mode():
        for kc, vc in runner.kv_caches:
            kc.normal_()
            vc.normal_()
        with tempfile.TemporaryDirectory() as tmp:
            files = [
                runner.read_adapter(write_peft_adapter(Path(tmp) / f"w{i}", cfg, 16, seed=i))
                for i in range(4)
            ]
        for s in range(n_ad):
            runner.write_slot(s, files[s % 4])
    gen = torch.Generator().manual_seed(0)
    if args.zipf:  # each sequence's adapter drawn with Zipf popularity
        w = 1.0 / torch.arange(1, n_ad + 1, dtype=torch.float64) ** args.zipf
        tok_slots = torch.multinomial(w, b, replacement=True, generator=gen).tolist()
    else:
        tok_slots = [i % n_ad for i in range(b)]
    used = len(set(tok_slots))
    elem = 2
    w_bytes = runner.loaded.weights.nbytes()
    kv = kv_read_bytes(cfg, b, ns.context, elem)
    base_floor = (base_step_bytes(cfg, w_bytes, b, elem) + kv) / bw
    lora_floor = base_floor + used * adapter_bytes(cfg, 16, elem) / bw
    side = runner.model.side_stream
    base_b = decode_batch(b, ns.context, per_seq, [-1] * b)
    dist_b = decode_batch(b, ns.context, per_seq, tok_slots)
    print(f"batch {b}, {used} adapters used of {n_ad} ({n_slots} slots, zipf {args.zipf}); "
          f"copy bw {bw / 1e9:.0f} GB/s; floors: base {base_floor * 1e3:.3f} ms, "
          f"with adapters {lora_floor * 1e3:.3f} ms")  # fmt: skip
    print("| variant | base ms | adapters ms | adapters/floor | LoRA over base ms |")
    print("|---|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name, v in VARIANTS:
            apply(runner, side, v)
            out = []
            for batch, lora in ((base_b, False), (dist_b, True)):
                for _ in range(3):
                    runner.execute(batch)
                out.append(gpu_step_seconds(runner, batch, lora, args.steps))
            tb, td = out
            print(
                f"| {name} | {tb * 1e3:.3f} | {td * 1e3:.3f} | {td / lora_floor:.3f} | "
                f"{(td - tb) * 1e3:.3f} |",
                flush=True,
            )
    apply(runner, side, {})
    if args.profile:
        with torch.inference_mode():
            for label, batch, lora in (("base", base_b, False), ("adapters", dist_b, True)):
                kernel_profile(runner, batch, lora, label)


def kernel_profile(runner, batch, lora: bool, label: str, steps: int = 5) -> None:
    """Device time per step by kernel name (torch profiler over graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    gpu_step_seconds(runner, batch, lora, 2)  # fills the static buffers, warm
    g, _ = runner.graphs.last_replayed  # the graph the step above picked
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            g.replay()
        torch.cuda.synchronize()
    tot: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            t = tot.setdefault(e.name[:70], [0.0, 0])
            t[0] += e.device_time / steps
            t[1] += 1 / steps
    print(f"\n{label}: graph replay, per step (sum {sum(v[0] for v in tot.values()) / 1e3:.3f} ms)")
    print("| kernel | us per step | launches per step |\n|---|---:|---:|")
    for name, (us, n) in sorted(tot.items(), key=lambda kv: -kv[1][0])[:16]:
        print(f"| `{name}` | {us:.0f} | {n:.0f} |")


if __name__ == "__main__":
    main()
