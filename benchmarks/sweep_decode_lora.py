"""Decode-step LoRA variants on one runner: where the side-stream LoRA time goes.

One command (CUDA): ``PYTHONPATH=. python benchmarks/sweep_decode_lora.py``. Builds
``dummy:llama3-8b`` (bf16, graphs up to batch 32, 32 slots of rank-16 adapters, KV at
context 512) once; for each variant it recaptures the decode graphs and times the
batch-32 step (graph replay + LM head, device time as in bench_decode.py) with base only,
and 32 distinct adapters (``--batch``, ``--adapters``, ``--zipf``, ``--slots``: other mixes,
e.g. the throughput benchmark's ~250-sequence steps over 32 Zipf adapters on 128 slots).
Each variant's adapter-step logits are checked against the first variant's (``logits off``:
max |diff| / max |first|; the script fails past 3e-2). Variants: LoRA in line, and SGMV
launch options (``config=`` of ``lora_shrink`` / ``lora_expand``, applied by wrapping the
module functions the model calls); ``--only`` runs the named ones (``--only "default|before 12-05"``: the launch configs before the 12-05 rules).
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

from loraplex.engine.kernels._triton import cdiv, num_sms
from loraplex.engine.kernels.lora_shrink import use_token_path

# the modules (engine.kernels re-exports functions of the same names)
S = importlib.import_module("loraplex.engine.kernels.lora_shrink")
E = importlib.import_module("loraplex.engine.kernels.lora_expand")
ORIG_S, ORIG_E = S.lora_shrink, E.lora_expand

VARIANTS: list[tuple[str, dict]] = [
    ("default", {}),
    # the table the engine's warm-up fills for this GPU model (ModelRunner.tune_lora, timed
    # before the benchmark's adapters are written; its picks are printed)
    ("tuned", {"tuned": True}),
    ("in line", {"in_line": True}),
    ("expand loop", {"expand": {"one_tile": False}}),
    # the launch configs before 2026-12-05, per call (before_shrink / before_expand): beside
    # the GEMMs one [256, 16] tile of B per per-token expand program (8 warps; ~49,000
    # programs a layer at batch 256, each a chain of dependent loads) and 256-wide K slices
    # in a rank-64 pool; the segment path's wave-sized splits; in line past one wave a loop
    # over two tiles. Now runs of tiles and longer K slices as the batch grows
    # (lora_expand._beside_gemm_tiles, lora_shrink._shrink_config)
    ("before 12-05", {"before": True}),
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
    # the two best of the H100 sweep at batch 256 (132 adapters in a rank-64 pool), together
    (
        "expand 4 tiles, 4 warps; shrink k_per 2048",
        {
            "expand": {"block_n": 256, "n_per": 1024, "one_tile": True, "num_warps": 4},
            "shrink": {"k_per": 2048},
        },
    ),
    (
        "expand 4 tiles; shrink k_per 2048",
        {"expand": {"block_n": 256, "n_per": 1024, "one_tile": True}, "shrink": {"k_per": 2048}},
    ),
    (
        "expand 2 tiles, 4 warps",
        {"expand": {"block_n": 256, "n_per": 512, "one_tile": True, "num_warps": 4}},
    ),
    ("default again", {}),
]


def with_config(orig, cfg: dict | None):
    """``orig`` (lora_shrink / lora_expand) with ``cfg`` as its tuning override."""
    if not cfg:
        return orig
    return lambda *args, config=None, **kw: orig(*args, config=dict(cfg), **kw)


def _sms(t: torch.Tensor) -> int:
    return num_sms(t.device) if t.is_cuda else 132


def before_shrink(x, lora_a, ranks, pages, meta, config=None, **kw):
    """lora_shrink with the K slices it took before 2026-12-05 (GPU only)."""
    T, K = x.shape[0] * kw.get("row_div", 1), x.shape[1]
    P, R = lora_a.shape[1], pages.shape[2] * lora_a.shape[2]
    beside = not kw.get("early_launch", True)
    cfg = None
    if beside and use_token_path(T, meta):
        cfg = {"k_per": 256} if R > 16 else None  # rank-16 pools: unchanged since
    elif beside and K >= 1024:  # the segment path's wave-sized splits, at every T
        tiles = cdiv(T, meta.block_m)
        split = max(1, min(cdiv(8 * _sms(x), max(1, tiles * P)), cdiv(K, 512), 16))
        cfg = {"k_per": cdiv(cdiv(K, split), 256) * 256}
    return ORIG_S(x, lora_a, ranks, pages, meta, config=cfg, **kw)


def before_expand(buf, lora_b, ranks, pages, offsets, meta, y, config=None, **kw):
    """lora_expand with the tiles it took before 2026-12-05 (GPU only)."""
    T = buf.shape[2]
    outs = [offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)]
    beside, rows = not kw.get("early_launch", True), use_token_path(T, meta)
    cfg = None
    if beside and rows:  # one [256, 16] tile a program, 8 warps
        cfg = {"block_n": 256, "n_per": 256, "one_tile": True, "num_warps": 8}
    elif beside and max(outs) >= 1024:  # the segment path's wave-sized N splits
        n_blocks = cdiv(max(outs), 128)
        units = cdiv(T, meta.block_m) * len(outs)
        n_split = max(1, min(n_blocks, cdiv(8 * _sms(y), units)))
        cfg = {"block_n": 128, "n_per": cdiv(n_blocks, n_split) * 128, "num_warps": 4}
    elif rows and buf.shape[3] <= 16:  # in line past one wave: a loop over two tiles
        if T * sum(cdiv(o, 2048) for o in outs) > 4 * _sms(y):
            cfg = {"block_n": 256, "n_per": 512, "one_tile": False, "num_warps": 4}
    return ORIG_E(buf, lora_b, ranks, pages, offsets, meta, y, config=cfg, **kw)


def kernels_for(v: dict):
    """(lora_shrink, lora_expand) under variant ``v``."""
    if v.get("before"):
        return before_shrink, before_expand
    return with_config(ORIG_S, v.get("shrink")), with_config(ORIG_E, v.get("expand"))


def apply(runner, side, v: dict, tuned=None) -> None:
    S.lora_shrink, E.lora_expand = kernels_for(v)
    runner.model.lora_configs = tuned if v.get("tuned") else None
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
    ap.add_argument(
        "--only", default="", help="variant names to run, separated by | (default: all)"
    )
    args = ap.parse_args()
    only = {v.strip() for v in args.only.split("|") if v.strip()}
    unknown = only - {name for name, _ in VARIANTS}
    if unknown:
        ap.error(f"unknown variants: {sorted(unknown)}")
    n_ad = args.adapters or args.batch
    n_slots = max(args.slots, n_ad)
    ns = argparse.Namespace(
        model="dummy:llama3-8b", context=args.context, block_size=16, rank=16,
        max_lora_rank=args.max_lora_rank, quantization=None, fp8_w8a8_min_tokens=1,
        kernel_config_dir=None, kv_cache_dtype="auto",
    )  # fmt: skip
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev, nbytes=1 << 30)
    b = args.batch
    runner = build_runner(ns, dev, b, n_slots)
    cfg = runner.config
    per_seq = -(-(ns.context + 1) // ns.block_size)
    tuned = None
    with torch.inference_mode():
        if not only or "tuned" in only:
            report = runner.tune_lora(save=False)
            tuned = runner.launch_configs
            for key in report:
                print(f"tuned {key}: {tuned.get('lora_decode', key) or 'the rules'}")
                for c, ms in sorted(report[key].items(), key=lambda kv: kv[1]):
                    print(f"    {ms:.3f} ms  {c}")
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
    print("| variant | base ms | adapters ms | adapters/floor | LoRA over base ms | logits off |")
    print("|---|---:|---:|---:|---:|---:|")
    first, off = None, []
    with torch.inference_mode():
        for name, v in VARIANTS:
            if only and name not in only:
                continue
            apply(runner, side, v, tuned)
            out = []
            for batch, lora in ((base_b, False), (dist_b, True)):
                for _ in range(3):
                    logits = runner.execute(batch)
                out.append(gpu_step_seconds(runner, batch, lora, args.steps))
            # the adapters step's logits against the first variant's: a launch config may
            # change the sums' order, not the result
            if first is None:
                first = logits.clone()
            err = float((logits - first).abs().max() / first.abs().max())
            if not err < 3e-2:
                off.append(name)
            tb, td = out
            print(
                f"| {name} | {tb * 1e3:.3f} | {td * 1e3:.3f} | {td / lora_floor:.3f} | "
                f"{(td - tb) * 1e3:.3f} | {err:.1e} |",
                flush=True,
            )
    apply(runner, side, {})
    if off:
        raise SystemExit(f"variants whose logits left the first variant's: {off}")
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
