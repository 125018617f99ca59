"""Expert LoRA in one Qwen3-30B-A3B MoE layer: the old path against the new, in one run (CUDA).

    PYTHONPATH=. python benchmarks/bench_moe_lora.py [--tokens 64,256,2048,8192] [--adapters 32]

(``--smoke``: a tiny layer on the CPU, Triton interpreted, eager times: checks the script.)

One MoE layer at Qwen3-30B-A3B's shapes (hidden 2048, 128 experts, top-8, expert width 768) in
bf16, ``--adapters`` adapters of ``--rank`` on every expert's gate/up/down in a LoRA pool of
that max rank (as ``bench_throughput.py --rank 8`` sizes it), each token's adapter drawn
Zipf(1.0). Per token count, four variants of the layer:

- ``base``: no LoRA;
- ``old``: the expert LoRA as before (per-token SGMV over every step's (token, expert) pairs,
  the shrink reading a repeated copy of the token rows: ``h.repeat_interleave(top_k)``);
- ``token``: the per-token kernels reading each pair's token row (decode steps now);
- ``grouped``: the segment kernels over the pairs grouped by (adapter, expert) on the device
  (prefill and mixed steps now, where their pairs fill the segments: ``expert_grouped``),
  the gate/up delta added inside the activation (``lora_silu_and_mul``); ``unfused``: the
  same with the delta added into the GEMM's output before the activation;
- ``beside``: ``token``'s kernels writing deltas on a high-priority side stream beside the
  grouped GEMMs (``moe_mlp(beside=True)``, as the model's ``moe_lora_beside`` runs decode
  steps; off by default until measured).

First the check: every LoRA variant's output against the torch references' (the same routing),
max |diff| / max |ref| < 3e-2. Then the times, each variant captured in a CUDA graph (the whole
layer: routing, sorting, GEMMs, LoRA) and replayed, and the ratios: ``lora / base`` for each
LoRA variant, ``old / new`` (new: what the engine picks for a step of that many tokens, a
decode step up to ``--decode-max``, else a prefill) and ``old / grouped``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

from loraplex.engine import kernels as K
from loraplex.engine.kernels import LoraMeta, build_lora_meta
from loraplex.engine.lora.pool import LoraPool
from loraplex.engine.lora.weights import LoraWeights, PackedGroup
from loraplex.engine.model.config import ModelConfig
from loraplex.engine.model.moe import expert_grouped, moe_mlp, route
from loraplex.engine.model.presets import PRESETS


def random_adapter(cfg: ModelConfig, rank: int, seed: int, dtype: torch.dtype) -> LoraWeights:
    """Rank ``rank`` on every expert's gate, up and down of every layer (packed as the reader
    packs them)."""
    gen = torch.Generator().manual_seed(seed)
    rows, H, MI = cfg.num_layers * cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size

    def group(P: int, in_f: int, out: int) -> PackedGroup:
        a = torch.randn(rows, P, rank, in_f, generator=gen) / in_f**0.5
        b = torch.randn(rows, out, rank, generator=gen) * 0.2 / rank**0.5
        ranks = torch.full((rows, P), rank, dtype=torch.int32)
        return PackedGroup(a.to(dtype), b.to(dtype), ranks)

    groups = {"experts_gate_up": group(2, H, 2 * MI), "experts_down": group(1, MI, H)}
    names = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")
    ranks = {(layer, m): rank for layer in range(cfg.num_layers) for m in names}
    return LoraWeights(groups, ranks, torch.empty(0, dtype=torch.uint8), {})


def moe_mlp_old(h, router, gate_up, down, config, groups, offsets, meta) -> torch.Tensor:
    """The layer as it ran before (engine/model/moe.py at a44d8e2), for the comparison."""
    T, top_k, E = h.shape[0], config.num_experts_per_tok, config.num_experts
    weights, ids = route(h, router, config)
    blocks = K.moe_blocks(ids, E)
    inter = K.moe_gemm(h, gate_up, ids, False, blocks)
    slot = meta.token_slot.long()[:, None]
    vslot = torch.where(slot >= 0, slot * E + ids.long(), -1).reshape(-1)
    pmeta = LoraMeta.per_token(vslot.to(torch.int32))

    def lora(x, g, y):
        grp = groups[g]
        buf = K.lora_shrink(x, grp.a, grp.ranks, grp.pages, pmeta)
        K.lora_expand(
            buf, grp.b, grp.ranks, grp.b_pages, offsets[g], pmeta, y, b_offsets=grp.b_offsets
        )

    lora(h.repeat_interleave(top_k, dim=0), "experts_gate_up", inter)
    act = K.silu_and_mul(inter)
    out = K.moe_gemm(act, down, ids, True, blocks)
    lora(act, "experts_down", out)
    return (out.view(T, top_k, -1) * weights[:, :, None]).sum(dim=1)


def graph_ms(fn, reps: int) -> float:
    """ms per replay of ``fn`` captured in a CUDA graph, the median (on the CPU: per eager
    call)."""
    if not torch.cuda.is_available():
        import time

        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import graph_median_ms

    return graph_median_ms(fn, torch.device("cuda"), reps)


def launch_variants(token, ref: torch.Tensor, base_ms: float, T: int, reps: int) -> None:
    """The per-token layer with the expert LoRA's kernels under each launch variant of
    ``sweep_decode_lora.py`` (the in-line one aside: the MoE LoRA runs in line), each checked
    against the reference first."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sweep_decode_lora as sw

    for name, v in sw.VARIANTS:
        if v.get("in_line"):
            continue
        sw.S.lora_shrink, sw.E.lora_expand = sw.kernels_for(v)
        try:
            err = rel(token(), ref)
            if not err < 3e-2:
                raise SystemExit(f"T={T}, {name}: off the reference ({err:.1e})")
            t = graph_ms(token, reps)
        finally:
            sw.S.lora_shrink, sw.E.lora_expand = sw.ORIG_S, sw.ORIG_E
        print(f"{T:>7} token, {name}: {t:.3f} ms, {t / base_ms:.3f} x base", flush=True)


def kernel_profile(fn, steps: int = 5) -> str:
    """Per kernel name and grid, the device time per call of ``fn`` (eager, synced; from the
    profiler's trace), largest first: where a variant's time goes."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import kernel_table

    return kernel_table(prof, steps, rows=30)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="64,256,2048,8192")
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--decode-max", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--launch-variants",
        action="store_true",
        help="also time the per-token layer under sweep_decode_lora.py's launch variants",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="dir: per-kernel device time of each variant at each token count (CUDA)",
    )
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    profiles: list[str] = []
    dev, dtype = torch.device("cuda"), torch.bfloat16
    cfg = dataclasses.replace(PRESETS["qwen3-30b-a3b"], num_layers=1)
    kernels = ""  # the default: Triton on CUDA
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke: set TRITON_INTERPRET=1")
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
        import kernel_testing  # noqa: F401  (the kernel tests' interpreter fixes)

        dev, dtype, kernels, args.reps = torch.device("cpu"), torch.float32, "triton", 1
        cfg = dataclasses.replace(
            cfg, hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2
        )
    E, H, MI = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    offsets = {"experts_gate_up": [0, MI, 2 * MI], "experts_down": [0, H]}
    os.environ["LORAPLEX_KERNELS"] = kernels
    per = (
        sum(E * (P * i + o) for P, i, o in ((2, H, 2 * MI), (1, MI, H)))
        * args.rank
        * torch.empty((), dtype=dtype).element_size()
    )  # one adapter's bytes
    pool = LoraPool(
        cfg, budget_bytes=2 * (args.adapters + 2) * per + 2**24,
        max_rank=args.rank, dtype=dtype, device=dev, max_slots=args.adapters,
    )  # fmt: skip
    for s in range(args.adapters):
        pool.write(s, random_adapter(cfg, args.rank, s, dtype))
    groups = {g: pool.layers[0][g] for g in offsets}
    gen = torch.Generator().manual_seed(0)
    router = torch.randn(E, H, generator=gen).div_(H**0.5).to(dev, dtype)
    gate_up = (torch.randn(E, 2 * MI, H, generator=gen) / H**0.5).to(dev, dtype)
    down = (torch.randn(E, H, MI, generator=gen) / MI**0.5).to(dev, dtype)
    zipf = 1.0 / np.arange(1, args.adapters + 1)
    zipf /= zipf.sum()
    rng = np.random.default_rng(0)
    name = "a tiny MoE layer" if args.smoke else "one MoE layer of qwen3-30b-a3b"
    print(f"{name}, {dtype}, {args.adapters} adapters of rank {args.rank}")
    print(f"{'tokens':>7} {'variant':>8} {'ms':>8} {'x base':>7} {'err':>8}")
    for T in [int(t) for t in args.tokens.split(",")]:
        h = torch.randn(T, H, generator=gen).to(dev, dtype)
        slots = torch.from_numpy(rng.choice(args.adapters, size=T, p=zipf).astype(np.int32))
        meta = build_lora_meta(slots).to(dev)
        call = (h, router, gate_up, down, cfg)
        side = torch.cuda.Stream(dev, priority=-1) if dev.type == "cuda" else None
        variants = {
            "base": partial(moe_mlp, *call, {}, offsets, None),
            "old": partial(moe_mlp_old, *call, groups, offsets, meta),
            "token": partial(moe_mlp, *call, groups, offsets, meta, grouped=False),
            "grouped": partial(moe_mlp, *call, groups, offsets, meta, grouped=True),
            # the same with the gate/up expand into the GEMM output, then the activation
            "unfused": partial(
                moe_mlp, *call, groups, offsets, meta, grouped=True, fuse_act=False
            ),
            # decode: the per-token LoRA as deltas beside the grouped GEMMs on a side stream
            "beside": partial(
                moe_mlp, *call, groups, offsets, meta, grouped=False, beside=True,
                side_stream=side,
            ),
        }  # fmt: skip
        os.environ["LORAPLEX_KERNELS"] = "ref"
        ref = moe_mlp(*call, groups, offsets, meta)
        os.environ["LORAPLEX_KERNELS"] = kernels
        errs = {name: rel(fn(), ref) for name, fn in variants.items() if name != "base"}
        bad = {k: v for k, v in errs.items() if not v < 3e-2}
        if bad:
            raise SystemExit(f"T={T}: LoRA variants off the reference: {bad}")
        ms = {name: graph_ms(fn, args.reps) for name, fn in variants.items()}
        for name, t in ms.items():
            err = f"{errs[name]:.1e}" if name in errs else ""
            print(f"{T:>7} {name:>8} {t:>8.3f} {t / ms['base']:>7.3f} {err:>8}")
        if args.profile and dev.type == "cuda":
            for name, fn in variants.items():
                profiles.append(f"==== {T} tokens, {name}\n" + kernel_profile(fn))
        if args.launch_variants:
            launch_variants(variants["token"], ref, ms["base"], T, args.reps)
        new = "grouped" if expert_grouped(meta, cfg, T <= args.decode_max) else "token"
        print(
            f"{T:>7} old/new ({new}) {ms['old'] / ms[new]:.2f}x, old/grouped "
            f"{ms['old'] / ms['grouped']:.2f}x; lora/base old {ms['old'] / ms['base']:.3f} "
            f"new {ms[new] / ms['base']:.3f}; beside/token {ms['beside'] / ms['token']:.3f}; "
            f"grouped fused/unfused {ms['grouped'] / ms['unfused']:.3f}",
            flush=True,
        )
    if profiles:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        (Path(args.profile) / "moe_lora_profile.txt").write_text("\n".join(profiles))
        print(f"kernel profiles written to {args.profile}", flush=True)


if __name__ == "__main__":
    main()
