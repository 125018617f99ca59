"""The gate/up LoRA expand inside the activation (``lora_silu_and_mul``) against expand then
activation, on one Llama-3-8B layer's gate/up output at prefill sizes.

One command (CUDA): ``PYTHONPATH=. python benchmarks/bench_lora_act.py [--tokens 512,2048,8192]``.
Per token count, tokens over 32 Zipf(1) adapters of rank 16 (``--mixed``: ranks 8-64 in a
rank-64 pool), the meta padded as the prefill graphs pad it; device time of a CUDA-graph
replay (median, ``triton.testing.do_bench``) of: ``act`` the activation alone (no LoRA: the
floor's kernel), ``unfused`` ``lora_expand`` into the GEMM output then ``silu_and_mul`` (the
layout before), and the fused kernel under its default launch config and the ``CONFIGS``
below. Floor: the activation's bytes (``[T, 2I]`` read, ``[T, I]`` written) over the copy
bandwidth of the same run.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sgmv import DT, GROUPS, Pool, copy_bandwidth, time_graph

from loraplex.engine.kernels import build_lora_meta
from loraplex.engine.kernels.lora_expand import lora_expand
from loraplex.engine.kernels.lora_shrink import lora_shrink
from loraplex.engine.kernels.lora_silu_and_mul import lora_silu_and_mul
from loraplex.engine.kernels.silu_and_mul import silu_and_mul

CONFIGS: list[dict] = [
    {"block_n": 64},
    {"block_n": 64, "num_stages": 2},
    {"block_n": 128, "num_stages": 2},
    {"block_n": 128, "n_per": 2048},
    {"block_n": 64, "num_warps": 2},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--mixed", action="store_true", help="ranks 8-64 in a rank-64 pool")
    ap.add_argument(
        "--block-m", default="16", help="the meta's tile heights to run, e.g. 16,64 (engine: 16)"
    )
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    bw = copy_bandwidth()
    n = args.adapters
    rank_choices = (8, 16, 32, 64) if args.mixed else (16,)
    max_rank = max(rank_choices)
    rc = torch.tensor(rank_choices)
    ranks = rc[torch.randint(len(rc), (n,), generator=gen)]
    pool = Pool(n, max_rank, ranks)
    print(f"copy bw {bw / 1e9:.0f} GB/s; {n} adapters, ranks {rank_choices}, pool rank {max_rank}")
    print("| tokens | variant | us | / floor | / unfused |")
    print("|---:|---|---:|---:|---:|")
    w = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    for T in [int(t) for t in args.tokens.split(",")]:
        for bm in [int(m) for m in args.block_m.split(",")]:
            run_tokens(T, gen, w, pool, ranks, bw, bm)


def run_tokens(T: int, gen, w, pool, ranks, bw: float, block_m: int) -> None:  # type: ignore[no-untyped-def]
    k, outs = GROUPS["gate_up"]
    inner = outs[0]
    a, b, pages = pool.a["gate_up"], pool.b["gate_up"], pool.pages["gate_up"]
    rk = pool.ranks["gate_up"]
    slot = torch.multinomial(w, T, replacement=True, generator=gen).to(torch.int32)
    meta = build_lora_meta(slot, max_segments=min(128, max(1, T // 2)), block_m=block_m)
    meta = meta.to("cuda")
    x = torch.randn(T, k, device="cuda", dtype=DT)
    gu = torch.randn(T, 2 * inner, device="cuda", dtype=DT)
    y = gu.clone()
    buf = lora_shrink(x, a, rk, pages, meta, max_rank=int(ranks.max()))
    floor_us = 3 * T * inner * 2 / bw * 1e6

    def unfused() -> torch.Tensor:
        lora_expand(buf, b, rk, pages, pool.offsets["gate_up"], meta, y)
        return silu_and_mul(y)

    def fused(c: dict | None) -> torch.Tensor:
        return lora_silu_and_mul(gu, buf, b, rk, pages, meta, config=c)

    ref = unfused().float()  # y = gu + delta once: the reference
    rows = [("act", lambda: silu_and_mul(gu)), ("unfused", unfused)]
    for cfg in [None, *CONFIGS]:
        name = "fused " + (str(cfg) if cfg else "default")
        err = (fused(cfg).float() - ref).abs().max() / ref.abs().max()
        if err > 3e-2:
            print(f"| {T} m{block_m} | {name} | off by {err:.2e}: skipped | | |")
            continue
        rows.append((name, partial(fused, cfg)))
    base = None
    for name, fn in rows:
        us = time_graph(fn, 1)
        base = us if name == "unfused" else base
        rel = f"{us / base:.3f}" if base else ""
        print(f"| {T} m{block_m} | {name} | {us:.1f} | {us / floor_us:.2f} | {rel} |", flush=True)


if __name__ == "__main__":
    main()
