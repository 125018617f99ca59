"""Decode-step LoRA variants on one runner: where the side-stream LoRA time goes.

One command (CUDA): ``PYTHONPATH=. python benchmarks/sweep_decode_lora.py``. Builds
``dummy:llama3-8b`` (bf16, graphs up to batch 32, 32 slots of rank-16 adapters, KV at
context 512) once; for each variant it recaptures the decode graphs and times the
batch-32 step (graph replay + LM head, device time as in bench_decode.py) with base only,
and 32 distinct adapters. Variants: the side stream's priority, LoRA in line, and the
per-token SGMV launch configurations (``config=`` of ``lora_shrink`` / ``lora_expand``,
applied by wrapping the module functions the model calls).
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
S = importlib.import_module("engine.kernels.lora_shrink")
E = importlib.import_module("engine.kernels.lora_expand")
ORIG_S, ORIG_E = S.lora_shrink, E.lora_expand

VARIANTS: list[tuple[str, dict]] = [
    ("default", {}),
    ("in line", {"in_line": True}),
    ("shrink 8 warps", {"shrink": {"num_warps": 8}}),
    ("expand n_per 512", {"expand": {"n_per": 512}}),
]


def apply(runner, side, v: dict) -> None:
    sc, ec = v.get("shrink"), v.get("expand")
    S.lora_shrink = (
        (lambda x, a, r, m, config=None: ORIG_S(x, a, r, m, config=sc)) if sc else ORIG_S
    )
    E.lora_expand = (
        (lambda b, w, r, o, m, y, config=None, accumulate=True: ORIG_E(
            b, w, r, o, m, y, config=ec, accumulate=accumulate))
        if ec else ORIG_E
    )  # fmt: skip
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
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    ns = argparse.Namespace(model="dummy:llama3-8b", context=512, block_size=16, rank=16)
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev, nbytes=1 << 30)
    b = args.batch
    runner = build_runner(ns, dev, b, b)
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
        for s in range(b):
            runner.write_slot(s, files[s % 4])
    elem = 2
    w_bytes = runner.loaded.weights.nbytes()
    base_floor = (base_step_bytes(cfg, w_bytes, b, elem) + kv_read_bytes(cfg, b, 512, elem)) / bw
    lora_floor = base_floor + b * adapter_bytes(cfg, 16, elem) / bw
    side = runner.model.side_stream
    base_b = decode_batch(b, ns.context, per_seq, [-1] * b)
    dist_b = decode_batch(b, ns.context, per_seq, list(range(b)))
    print(f"copy bw {bw / 1e9:.0f} GB/s; floors: base {base_floor * 1e3:.3f} ms, "
          f"{b} distinct {lora_floor * 1e3:.3f} ms")  # fmt: skip
    print("| variant | base ms | distinct ms | distinct/floor | LoRA over base ms |")
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


if __name__ == "__main__":
    main()
