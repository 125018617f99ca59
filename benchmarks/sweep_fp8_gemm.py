"""The Triton FP8 GEMM's launch configs on one GPU, wide: which tile shapes, K splits, operand
orders and activation types bring decode-sized GEMMs nearest their 1-byte floor, and what the
decode step with adapters makes of them. One command (CUDA, compute capability >= 8.9):

    PYTHONPATH=. python benchmarks/sweep_fp8_gemm.py --json $OUT/sweep.json

1. GEMMs: each of Llama-3-8B's four projection shapes over ``--layers`` (32) distinct weights
   (nothing stays in L2), one CUDA graph per case, at ``--ms`` tokens: bf16 ``F.linear``,
   ``torch._scaled_mm`` alone on pre-quantized activations (cuBLASLt's FP8), the kernel's
   default config and every config of the grid (``a8`` 0/1: bf16 or FP8 activations;
   ``swap`` 0/1: the tile as ``x W^T`` or ``W x^T``; N tile; K step; K split, ``fixup`` 0/1:
   its last split reducing or a second pass; stages), each against the 1-byte floor at
   ``--floor-bw``. Prints the best configs per shape and token count, and the sum over the
   four shapes (a layer's GEMMs) of the best against bf16 and the floor.
2. Decode (``--decode``): the FP8 runner of ``--model`` at batch ``--batch`` with distinct
   rank-16 adapters and without, its decode graphs captured again under each policy (the
   warm-up's tuned table; the defaults with FP8 activations and weight-only; the sweep's best
   per shape of each), and the bf16 runner as the baseline. GPU ms per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import graph_median_ms, write_json

from loraplex.engine.kernels._triton import cdiv, num_sms
from loraplex.engine.kernels.fp8_linear import (
    default_w8a16_config,
    fp8_linear_w8a16,
    quantize_rows,
)
from loraplex.engine.model.fp8 import quantize_per_channel

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ms", default="1,8,16,32,64")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--floor-bw", type=float, default=4.2e12)
    p.add_argument("--decode", action="store_true")
    p.add_argument("--model", default="dummy:llama3-8b")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def bm_of(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def grid(m: int) -> list[dict]:
    """Weight-only (``a8`` 0: e4m3 widened to bf16 in registers) and FP8 x FP8 (``a8`` 1: the
    activations quantized per token and 128-wide K step in the kernel) launch configs."""
    bm = bm_of(m)
    rows = [  # a8, swap, block_n, block_k, split, fixup, stages, warps
        (0, 0, 32, 256, 1, 0, 4, 4), (0, 0, 32, 128, 4, 1, 4, 4), (0, 1, 64, 128, 1, 0, 4, 4),
        (0, 1, 64, 128, 4, 1, 4, 4), (0, 1, 64, 128, 4, 0, 4, 4),
        *[(1, 1, bn, 128, sp, fx, 4, 4) for bn in (64, 128)
          for sp, fx in ((1, 0), (2, 1), (4, 1), (4, 0))],
        *[(1, 0, bn, 128, sp, fx, 4, 4) for bn in (64, 128) for sp, fx in ((1, 0), (4, 1))],
        (1, 1, 128, 128, 1, 0, 3, 8), (1, 1, 256, 128, 1, 0, 3, 8), (1, 1, 128, 128, 4, 1, 3, 8),
        (1, 1, 64, 128, 1, 0, 6, 4), (1, 1, 128, 128, 8, 1, 4, 4),
    ]  # fmt: skip
    return [
        {
            "block_m": bm,
            "block_n": bn,
            "block_k": bk,
            "split": sp,
            "num_warps": w,
            "num_stages": st,
            "swap": sw,
            "a8": a8,
            "fixup": fx,
        }
        for a8, sw, bn, bk, sp, fx, st, w in rows
    ]


def graph_ms(fn, reps: int, device) -> float:
    return graph_median_ms(fn, device, reps)


def programs(cfg: dict, m: int, n: int, k: int) -> int:
    k_per = cdiv(cdiv(k, cfg["split"]), cfg["block_k"]) * cfg["block_k"]
    return cdiv(n, cfg["block_n"]) * cdiv(m, cfg["block_m"]) * cdiv(k, k_per)


def sweep_shape(args, device, sms: int, gen, name: str, n: int, k: int) -> list[dict]:
    dense = [torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
             for _ in range(args.layers)]  # fmt: skip
    fp8 = [quantize_per_channel(w) for w in dense]
    rows = []
    for m in [int(x) for x in args.ms.split(",")]:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        xq, xs = quantize_rows(x)

        def bf16(x=x) -> None:
            for w in dense:
                F.linear(x, w)

        def scaled_mm(xq=xq, xs=xs) -> None:
            for w in fp8:
                torch._scaled_mm(xq, w.qweight.t(), scale_a=xs, scale_b=w.scale.view(1, -1),
                                 out_dtype=torch.bfloat16)  # fmt: skip

        def run(cfg: dict, x=x) -> None:
            for w in fp8:
                fp8_linear_w8a16(x, w.qweight, w.scale, None, None, cfg)

        default = default_w8a16_config(m, n, k, None, True, sms)
        times = {}
        for cfg in [default, *grid(m)]:
            key = json.dumps(cfg, sort_keys=True)
            if key in times:
                continue
            try:
                times[key] = graph_ms(lambda cfg=cfg: run(cfg), args.reps, device)
            except Exception as exc:  # too much shared memory for this part, etc.
                print(f"  {name} M={m} {cfg}: {type(exc).__name__}", flush=True)
        ranked = sorted(times.items(), key=lambda kv: kv[1])
        one_wave = [(c, t) for c, t in ranked if programs(json.loads(c), m, n, k) <= sms]
        row = {
            "M": m,
            "floor_ms": args.layers * (n * k + 2 * m * (k + n)) / args.floor_bw * 1e3,
            "bf16_ms": graph_ms(bf16, args.reps, device),
            "scaled_mm_ms": graph_ms(scaled_mm, args.reps, device),
            "default_ms": times[json.dumps(default, sort_keys=True)],
            "default": default,
            "best": [(json.loads(c), t) for c, t in ranked[:5]],
            "best_one_wave": [(json.loads(c), t) for c, t in one_wave[:3]],
            "best_w8a16": [(json.loads(c), t) for c, t in ranked if '"a8": 1' not in c][:3],
            "best_a8": [(json.loads(c), t) for c, t in ranked if '"a8": 1' in c][:3],
            "all": times,
        }
        rows.append(row)
        b, fl = ranked[0][1], row["floor_ms"]
        print(
            f"{name:8s} M={m:3d}  floor {fl:.3f}  bf16 {row['bf16_ms']:.3f}  "
            f"scaled_mm {row['scaled_mm_ms']:.3f}  default {row['default_ms']:.3f}  "
            f"best {b:.3f} ({b / fl:.2f}x floor, bf16/best {row['bf16_ms'] / b:.2f})  "
            f"{ranked[0][0]}  one-wave {one_wave[0][1] if one_wave else float('nan'):.3f}",
            flush=True,
        )
    return rows


def gemm_sweep(args, device) -> dict:
    sms = num_sms(device)
    gen = torch.Generator(device=device).manual_seed(0)
    result: dict = {"sms": sms, "shapes": {}}
    for name, (n, k) in SHAPES.items():
        result["shapes"][name] = sweep_shape(args, device, sms, gen, name, n, k)
        torch.cuda.empty_cache()
    # a layer's four GEMMs: sums of each case
    summary = []
    for i, m in enumerate(int(x) for x in args.ms.split(",")):
        rs = [result["shapes"][s][i] for s in SHAPES]
        tot = {f: sum(r[f] for r in rs) for f in ("floor_ms", "bf16_ms", "scaled_mm_ms",
                                                    "default_ms")}  # fmt: skip
        tot["best_ms"] = sum(r["best"][0][1] for r in rs)
        tot["best_one_wave_ms"] = sum((r["best_one_wave"] or r["best"])[0][1] for r in rs)
        tot["M"] = m
        tot["best/floor"] = tot["best_ms"] / tot["floor_ms"]
        tot["bf16/best"] = tot["bf16_ms"] / tot["best_ms"]
        summary.append(tot)
        print("sum", json.dumps({k: round(v, 3) for k, v in tot.items()}), flush=True)
    result["summary"] = summary
    return result


def decode_policies(args, device, sweep: dict | None) -> list[dict]:
    from bench_decode import decode_batch, gpu_step_seconds
    from bench_fp8 import load_adapters, make_runner

    from loraplex.engine.model.llama import fp8_shape_key

    ns = argparse.Namespace(
        model=args.model, batch=args.batch, context=args.context, rank=16, prefill_len=16,
        prefill_seqs=1, prompt_len=16, steps=1, fp8_w8a8_min_tokens=1,
    )  # fmt: skip
    per_seq = -(-(args.context + 1) // 16)
    out = []
    tmp = Path(tempfile.mkdtemp())

    def measure(runner, label: str) -> None:
        for mode, slots in (("base", [-1] * args.batch), ("distinct", list(range(args.batch)))):
            batch = decode_batch(args.batch, args.context, per_seq, slots)
            for _ in range(3):
                runner.execute(batch)
            ms = gpu_step_seconds(runner, batch, mode != "base", 20) * 1e3
            out.append({"policy": label, "mode": mode, "gpu_ms": ms})
            print(f"decode {label:24s} {mode:8s} {ms:.3f} ms", flush=True)

    with torch.inference_mode():
        r = make_runner(ns, device, None, None)
        load_adapters(ns, r, tmp)
        measure(r, "bf16")
        del r
        torch.cuda.empty_cache()
        r = make_runner(ns, device, "fp8", tmp / "cfg")
        load_adapters(ns, r, tmp)
        measure(r, "fp8 tuned (warm-up)")
        table = r.launch_configs.table.setdefault("fp8_w8a16", {})
        tuned = dict(table)
        w_of = {nm: getattr(r.loaded.weights.layers[0], nm) for nm in SHAPES}
        # label -> (FP8 activations from this many tokens, launch configs by shape key)
        policies: dict[str, tuple[int, dict]] = {
            "fp8 defaults": (1, {}),
            "fp8 defaults weight-only": (1 << 30, {}),
        }
        if sweep is not None:
            for pick in ("best_w8a16", "best_a8"):
                a8 = pick == "best_a8"
                pol = {}
                for nm, w in w_of.items():
                    for row in sweep["shapes"][nm]:
                        if row["M"] >= 16 and row[pick]:  # the buckets m16, m32, m64
                            pol[fp8_shape_key(w, row["M"], a8)] = row[pick][0][0]
                policies[f"fp8 sweep {pick}"] = (1 if a8 else 1 << 30, pol)
        for label, (min_tokens, pol) in policies.items():
            table.clear()
            table.update(pol)
            r.model.fp8.w8a8_min_tokens = min_tokens
            r.graphs.capture()
            measure(r, label)
        table.clear()
        table.update(tuned)
        r.model.fp8.w8a8_min_tokens = 1
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(device)}
    res["gemm"] = gemm_sweep(args, device)
    if args.decode:
        res["decode"] = decode_policies(args, device, res["gemm"])
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
