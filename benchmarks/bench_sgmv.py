"""SGMV shrink+expand for the seven LoRA projections of one Llama-3-8B layer.

One command: ``python benchmarks/bench_sgmv.py`` (on a CUDA machine). For each case it times
one layer (4 groups: qkv, o, gate_up, down; shrink + expand each) inside a CUDA graph of
32 layers by default (``--min-layers``; Llama-3-8B's depth), each with its own slot pool (as
in a model: weights cold in L2, the per-step metadata and activations warm), at least 256 MB
of LoRA weights in all (at most 16 GB: the largest mixed-rank cases take fewer layers), and
reports the time per layer (median of replays over the number of layers), with:

- the bytes floor: x, A, B read once, y read and written once, over the device-to-device copy
  bandwidth measured in the same run;
- two torch baselines in CUDA graphs too: a matmul loop per adapter (index_select, two
  matmuls, index_add per segment and projection) and gather + bmm (per-token weights gathered).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraplex.engine.kernels import build_lora_meta
from loraplex.engine.kernels.lora_expand import lora_expand
from loraplex.engine.kernels.lora_shrink import lora_shrink

HIDDEN, INTER, KV = 4096, 14336, 1024
GROUPS = {  # name: (in_features, [out per projection])
    "qkv": (HIDDEN, [HIDDEN, KV, KV]),
    "o": (HIDDEN, [HIDDEN]),
    "gate_up": (HIDDEN, [INTER, INTER]),
    "down": (INTER, [HIDDEN]),
}
DT = torch.bfloat16
PAGE_ROWS = 8  # the engine pool's (engine/lora/pool.py)
# layers per timed graph: at least this many (Llama-3-8B's depth: a graph of 2 layers charges
# each layer half of the replay's fixed cost, 13 us on the H100) and at least 256 MB of
# weights, as long as the pools stay within 16 GB (large mixed-rank cases take fewer layers)
MIN_LAYERS = 32
MAX_POOL_BYTES = 16 << 30


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")  # 512 MiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


class Pool:
    """Per-group LoRA slot pool (one layer), zero beyond each adapter's rank: the kernels read
    it paged as the engine's pool is (``PAGE_ROWS`` rank rows per page, a page table per slot
    and projection); the torch baselines read padded copies ``a_pad[slots, P, R, k]``,
    ``b_pad[slots, N, R]``."""

    def __init__(self, num_slots: int, max_rank: int, ranks: torch.Tensor):
        self.a, self.b, self.offsets, self.pages = {}, {}, {}, {}
        self.a_pad, self.b_pad = {}, {}
        self.ranks = {}
        S, PR = num_slots, min(PAGE_ROWS, max_rank)
        npg = max_rank // PR
        for g, (k, outs) in GROUPS.items():
            P, N = len(outs), sum(outs)
            a = torch.randn(num_slots, P, max_rank, k, device="cuda", dtype=DT) / k**0.5
            b = torch.randn(num_slots, N, max_rank, device="cuda", dtype=DT) / max_rank**0.5
            r = ranks[:, None].expand(num_slots, P).contiguous().to(torch.int32).cuda()
            ar = torch.arange(max_rank, device="cuda")
            a *= (ar[None, None, :, None] < r[:, :, None, None]).to(DT)
            offs = [0]
            for o in outs:
                offs.append(offs[-1] + o)
            keep = torch.zeros(num_slots, N, max_rank, device="cuda", dtype=DT)
            for p in range(P):
                keep[:, offs[p] : offs[p + 1]] = (ar[None, None, :] < r[:, p, None, None]).to(DT)
            b *= keep
            # pages: slot s's rows [j * PR, (j + 1) * PR) are page s * npg + j (every
            # projection's rows of a page side by side: A's stride over P is one page's rows)
            self.a[g] = a.view(S, P, npg, PR, k).transpose(1, 2).contiguous().view(-1, P, PR, k)
            self.b[g] = b.view(S, N, npg, PR).transpose(1, 2).contiguous().view(-1, N, PR)
            pg = torch.arange(S * npg, dtype=torch.int32, device="cuda").view(S, 1, npg)
            self.pages[g] = pg.expand(S, P, npg).contiguous()
            self.a_pad[g], self.b_pad[g], self.offsets[g], self.ranks[g] = a, b, offs, r


def make_case(
    T: int, n_adapters: int | None, mixed: bool, gen: torch.Generator,
    rank_choices: tuple[int, ...] = (8, 16, 32, 64),
):  # fmt: skip
    """-> token_slot [T], rank per slot (16, or mixed: one of ``rank_choices``). n_adapters
    None = all distinct."""
    if n_adapters is None or n_adapters >= T:
        n = T
        slot = torch.randperm(T, generator=gen)
    else:
        n = n_adapters
        slot = torch.randint(n, (T,), generator=gen)
    if mixed:
        rc = torch.tensor(rank_choices)
        ranks = rc[torch.randint(len(rc), (max(n, 1),), generator=gen)]
    else:
        ranks = torch.full((max(n, 1),), 16)
    return slot.to(torch.int32), ranks


def floor_bytes(T, token_slot, ranks):
    used = sorted(set(token_slot.tolist()))
    total = 0
    for k, outs in GROUPS.values():
        N = sum(outs)
        total += T * k * 2 + 2 * T * N * 2  # x once, y read + write
        for s in used:
            r = int(ranks[s])
            total += len(outs) * r * k * 2 + N * r * 2
    return total


def time_graph(fn, layers: int) -> float:
    """Median microseconds per layer of a CUDA-graph replay of fn (which runs all layers)."""
    fn()  # compile / warm up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ms = triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")
    return ms * 1e3 / layers


def run_case(
    T: int, n_ad: int | None, mixed: bool, pool_slots: int, gen: torch.Generator, pad: int = 0,
    variants: list[tuple[str, dict | None, dict | None]] | None = None,
    pool_rank: int | None = None, buf_bytes: dict[str, int] | None = None,
    rank_choices: tuple[int, ...] = (8, 16, 32, 64),
):  # fmt: skip
    """-> ({label: µs per layer}, floor bytes). Labels: sgmv, loop, bmm; or with
    ``variants`` ((name, shrink config, expand config), ...) one SGMV time per variant.
    ``pool_rank``: the pools' max rank (default 64 for mixed ranks, else 16); ``buf_bytes``:
    filled with each variant's partials bytes over the layer's four groups."""
    token_slot, ranks = make_case(T, n_ad, mixed, gen, rank_choices)
    ranks_full = torch.zeros(pool_slots, dtype=torch.int64)
    ranks_full[: ranks.shape[0]] = ranks
    max_rank = pool_rank or (64 if mixed else 16)
    pool = Pool(pool_slots, max_rank, ranks_full)
    per_layer = sum(t.numel() * 2 for t in [*pool.a.values(), *pool.b.values()])
    n_layers = max(MIN_LAYERS, min(256, -(-(256 << 20) // per_layer)))
    n_layers = max(2, min(n_layers, MAX_POOL_BYTES // per_layer))
    pools = [pool] + [Pool(pool_slots, max_rank, ranks_full) for _ in range(n_layers - 1)]
    # pad > 0: the metadata padded to that many segments, as the decode CUDA graphs build it
    n_seg = len(set(token_slot.tolist()))
    meta = build_lora_meta(token_slot, max_segments=max(pad, n_seg) if pad else None).to("cuda")
    xs = {g: torch.randn(T, k, device="cuda", dtype=DT) for g, (k, _) in GROUPS.items()}
    ys = {g: torch.randn(T, sum(o), device="cuda", dtype=DT) for g, (_, o) in GROUPS.items()}
    seg_start = meta.seg_start.tolist()
    segs = [
        (int(s), meta.sorted_tokens[seg_start[i] : seg_start[i + 1]].long())
        for i, s in enumerate(meta.seg_slot.tolist())
        if s >= 0
    ]
    ts_long = token_slot.long().cuda()

    def sgmv():
        for pool in pools:
            sgmv_layer(pool)

    def loop():
        for pool in pools:
            loop_layer(pool)

    def gather_bmm():
        for pool in pools:
            gather_bmm_layer(pool)

    # the step's largest rank, as the runner claims it (LoraPool.ranks_used)
    step_rank = int(ranks_full[token_slot.long().unique()].max())

    def sgmv_layer(pool, sc=None, ec=None, bufs=None):
        for g in GROUPS:
            s = _pick(sc, g)
            if s and s.get("skip"):  # marginal cost of a group: leave it out
                continue
            buf = lora_shrink(
                xs[g], pool.a[g], pool.ranks[g], pool.pages[g], meta, config=s, max_rank=step_rank
            )
            e = _pick(ec, g)
            if e and e.get("skip"):
                continue
            lora_expand(
                buf, pool.b[g], pool.ranks[g], pool.pages[g], pool.offsets[g], meta, ys[g],
                config=e,
            )  # fmt: skip
            if bufs is not None:
                bufs.append(buf.numel() * 4)

    def loop_layer(pool):
        for g in GROUPS:
            offs = pool.offsets[g]
            for s, idx in segs:
                xi = xs[g].index_select(0, idx)
                for p in range(len(offs) - 1):
                    h = xi @ pool.a_pad[g][s, p].T
                    d = h @ pool.b_pad[g][s, offs[p] : offs[p + 1]].T
                    ys[g][:, offs[p] : offs[p + 1]].index_add_(0, idx, d)

    def gather_bmm_layer(pool):
        for g in GROUPS:
            a = pool.a_pad[g][ts_long]  # [T, P, R, k]
            P, R = a.shape[1], a.shape[2]
            h = torch.bmm(a.view(T, P * R, -1), xs[g][:, :, None]).view(T, P, R)
            b = pool.b_pad[g][ts_long]  # [T, N, R]
            offs = pool.offsets[g]
            for p in range(P):
                n0, n1 = offs[p], offs[p + 1]
                ys[g][:, n0:n1] += torch.bmm(b[:, n0:n1], h[:, p, :, None])[:, :, 0]

    # correctness against gather + bmm on the same inputs (both add into copies of y), for
    # every launch variant timed
    y0 = {g: y.clone() for g, y in ys.items()}
    gather_bmm_layer(pool)
    want = {g: y.clone() for g, y in ys.items()}
    for name, sc, ec in variants or [("default", None, None)]:
        for g, y in ys.items():
            y.copy_(y0[g])
        nb: list[int] = []
        sgmv_layer(pool, sc, ec, nb)
        if buf_bytes is not None:
            buf_bytes[name] = sum(nb)
        for g in GROUPS:
            if any((_pick(c, g) or {}).get("skip") for c in (sc, ec)):
                continue
            ref, d0 = want[g].float(), y0[g].float()
            d = (ys[g].float() - ref).norm() / (ref - d0).norm()
            if not d < 3e-2:
                raise SystemExit(f"SGMV ({name}) differs from gather+bmm on {g}: rel err {d:.3g}")
    fns = [("sgmv", sgmv), ("loop", loop), ("bmm", gather_bmm)]
    if variants is not None:
        fns = [
            (name, partial(_sgmv_variant, sgmv_layer, pools, sc, ec)) for name, sc, ec in variants
        ]
    res = {label: time_graph(fn, n_layers) for label, fn in fns}
    return res, floor_bytes(T, token_slot, ranks_full)


def _pick(config: dict | None, group: str) -> dict | None:
    """A variant's config for one group: ``{"groups": {name: config}}`` sets them per group."""
    if config and "groups" in config:
        return config["groups"].get(group)
    return config


def _sgmv_variant(layer, pools, sc, ec):
    for pool in pools:
        layer(pool, sc, ec)


# --variants: launch options of both kernels against the defaults, whole layer in one graph;
# "skip" leaves a group (shrink config) or its expand out (the marginal cost of the rest)
LOOP = {"one_tile": False, "block_n": 256, "n_per": 512, "num_warps": 4, "preload": False}


def _tiles(block_n: int, n_per: int, warps: int = 4, preload: bool = True) -> dict:
    return {"one_tile": True, "block_n": block_n, "n_per": n_per, "num_warps": warps,
            "preload": preload}  # fmt: skip


# the defaults before the in-line shrink took one preloaded A tile and the in-line expand the
# tiled rule, as they were at 64 and 128 tokens (the old rule's choices at those sizes)
PREVIOUS = (
    {"one_tile": False, "block_k": 256, "k_per": 512},
    {"groups": {"qkv": LOOP, "o": _tiles(512, 512), "gate_up": LOOP, "down": _tiles(512, 512)}},
)
VARIANTS: list[tuple[str, dict | None, dict | None]] = [
    ("default", None, None),
    ("previous defaults (64 / 128 tokens)", *PREVIOUS),
    ("shrink previous", PREVIOUS[0], None),
    ("expand previous", None, PREVIOUS[1]),
    ("default again", None, None),
]


def run_variants(tokens: list[int], bw: float, slots: int, distinct_only: bool = False) -> None:
    """One row per variant, one column per case: µs per layer (ratio to the bytes floor)."""
    gen = torch.Generator().manual_seed(0)
    cases = [("distinct r16", None)] + ([] if distinct_only else [("32 x r16", 32)])
    cols, results = [], []
    for case, n_ad in cases:
        for T in tokens:
            pool_slots = T if n_ad is None else n_ad
            res, nbytes = run_case(T, n_ad, False, pool_slots, gen, slots, VARIANTS)
            torch.cuda.empty_cache()
            f = nbytes / bw * 1e6
            cols.append(f"{case} T={T} (floor {f:.1f})")
            results.append((res, f))
            best = min(res, key=res.get)
            print(f"{case} T={T}: floor {f:.1f} us, best {best}: {res[best]:.1f} us", flush=True)
    print("\n| variant | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, _, _ in VARIANTS:
        cells = " | ".join(f"{res[name]:.1f} ({res[name] / f:.2f}x)" for res, f in results)
        print(f"| {name} | {cells} |")


def run_rank_split(tokens: list[int], bw: float, slots: int) -> None:
    """Mixed ranks 8-64, all distinct: the per-token shrink with rank-bucketed tiles (the
    default) against one tile shape for every rank (``rank_split`` off)."""
    gen = torch.Generator().manual_seed(0)
    variants = [("rank buckets", None, None), ("one tile shape", {"rank_split": False}, None)]
    for T in tokens:
        res, nbytes = run_case(T, None, True, T, gen, slots, variants)
        torch.cuda.empty_cache()
        f = nbytes / bw * 1e6
        cells = "  ".join(f"{k} {v:.1f} us (x{v / f:.2f})" for k, v in res.items())
        print(f"distinct r8-64 T={T}: floor {f:.1f} us  {cells}", flush=True)


# --seg-rank: the segment path (prefill / mixed steps) sized by the step's largest rank
# against the pool's (the old behaviour: "r_eff" off, one tile shape for every rank)
SEG_OLD = ({"r_eff": False, "rank_split": False}, {"rank_split": False})
SEG_VARIANTS: list[tuple[str, dict | None, dict | None]] = [
    ("old", *SEG_OLD),
    ("new", None, None),
    ("new, width only", {"rank_split": False}, {"rank_split": False}),
    ("new, <= 4 K splits", {"max_split": 4}, None),
    ("old again", *SEG_OLD),
]
SEG_CASES = [  # name, adapters, mixed, rank choices
    ("1 x r16", 1, False, ()),
    ("8 x r16", 8, False, ()),
    ("32 x r16", 32, False, ()),
    ("32 x r8-32", 32, True, (8, 16, 32)),
    ("32 x r8-64", 32, True, (8, 16, 32, 64)),
]


def run_seg_rank(tokens: list[int], bw: float, pool_rank: int) -> None:
    """Per case: µs per layer of each of SEG_VARIANTS (rows: new / old in the same run), the
    bytes floor, and the partials' bytes (KS * P * T * R * 4, written by the shrink then
    read by the expand) of the old and new widths. Adapters in a pool of ``pool_rank``."""
    gen = torch.Generator().manual_seed(0)
    print(f"segment path, pool max rank {pool_rank}; per layer (4 groups, shrink + expand)")
    table = []
    for case, n_ad, mixed, rc in SEG_CASES:
        for T in tokens:
            nb: dict[str, int] = {}
            res, nbytes = run_case(
                T, n_ad, mixed, n_ad, gen, 0, SEG_VARIANTS, pool_rank, nb, rc or (8, 16, 32, 64)
            )
            torch.cuda.empty_cache()
            f = nbytes / bw * 1e6
            old = (res["old"] + res["old again"]) / 2
            cells = "  ".join(f"{k} {v:.1f} us ({v / old:.2f})" for k, v in res.items())
            mb = "  ".join(f"{k} {v / 2**20:.2f}" for k, v in nb.items() if "again" not in k)
            print(
                f"{case} T={T}: floor {f:.1f} us ({nbytes / 2**20:.1f} MiB)  {cells}\n"
                f"    partials MiB: {mb}",
                flush=True,
            )
            table.append((case, T, f, old, res, nb))
    names = [n for n, _, _ in SEG_VARIANTS if "again" not in n and n != "old"]
    print("\n| case | T | floor us | old us | " + " | ".join(f"{n} us (/old)" for n in names)
          + " | partials MiB old -> new |")  # fmt: skip
    print("|---|---:|---:|---:|" + "---:|" * len(names) + "---:|")
    for case, T, f, old, res, nb in table:
        cells = " | ".join(f"{res[n]:.1f} ({res[n] / old:.2f})" for n in names)
        print(
            f"| {case} | {T} | {f:.1f} | {old:.1f} | {cells} | "
            f"{nb['old'] / 2**20:.2f} -> {nb['new'] / 2**20:.2f} |"
        )


def profile(T: int, n_ad: int | None = None, slots: int = 0) -> None:
    """Per-kernel device times of one layer, rank-16 adapters (all distinct, or ``n_ad``),
    eager launches; ``slots``: metadata padded to that many segments."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    gen = torch.Generator().manual_seed(0)
    token_slot, ranks = make_case(T, n_ad, False, gen)
    ranks = torch.cat([ranks, ranks.new_zeros(max(0, slots - len(ranks)))])
    pool = Pool(len(ranks), 16, ranks)
    meta = build_lora_meta(token_slot, max_segments=len(ranks) if slots else None)
    meta = meta.to("cuda")
    xs = {g: torch.randn(T, k, device="cuda", dtype=DT) for g, (k, _) in GROUPS.items()}
    ys = {g: torch.randn(T, sum(o), device="cuda", dtype=DT) for g, (_, o) in GROUPS.items()}
    flush = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")

    def layer():
        for g in GROUPS:
            buf = lora_shrink(xs[g], pool.a[g], pool.ranks[g], pool.pages[g], meta)
            lora_expand(buf, pool.b[g], pool.ranks[g], pool.pages[g], pool.offsets[g], meta, ys[g])

    layer()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            flush.zero_()
            layer()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type.name == "CUDA"]
    for e in evs[-len(evs) // 3 :]:
        print(f"{e.name[:60]:60s} {e.device_time:8.1f} us")


def _shrink_all(pools, x, g, meta, c):
    for p in pools:
        lora_shrink(x, p.a[g], p.ranks[g], p.pages[g], meta, config=c)


def _expand_all(pools, bufs, y, g, meta, c):
    for p, b in zip(pools, bufs, strict=True):
        lora_expand(b, p.b[g], p.ranks[g], p.pages[g], p.offsets[g], meta, y, config=c)


def sweep(tokens=(1, 64), n_ad: int | None = None, slots: int = 0) -> None:
    """Per-group time of shrink and expand configurations, rank 16, all distinct or ``n_ad``
    adapters; ``slots``: metadata padded to that many segments. Each kernel alone (a chain of
    one group's shrinks, or expands, over the layers' pools in one graph), against its floor:
    the shrink's A and x, the expand's B and y read + written, over the copy bandwidth."""
    variants = [
        {"prefetch": False},
        {"launch_pdl": False, "prefetch": False},
        {"rows": False},
        {"rows": True},
    ]
    shrink_cfgs = variants + [
        {"block_k": bk, "k_per": kp, "num_warps": w, "num_stages": st}
        for bk, kp in ((128, 256), (256, 512), (256, 1024), (256, 2048))
        for w, st in ((4, 2), (8, 2), (4, 3))
    ]
    expand_cfgs = variants + [
        {"one_tile": False},
        {"preload": True},
        {"block_n": 512, "n_per": 512, "num_warps": 4, "preload": True},
    ] + [
        {"block_n": bn, "n_per": npp, "num_warps": w, "num_stages": st}
        for bn, npp in ((128, 512), (256, 512), (256, 768), (256, 1024), (256, 2048))
        for w, st in ((4, 3), (2, 3), (4, 4), (8, 3))
    ]  # fmt: skip
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator().manual_seed(0)
    for T in tokens:
        token_slot, ranks = make_case(T, n_ad, False, gen)
        n = len(ranks)
        ranks = torch.cat([ranks, ranks.new_zeros(max(0, slots - n))])
        pools = [Pool(max(n, slots), 16, ranks) for _ in range(max(2, 2048 // (n * 3)))]
        meta = build_lora_meta(token_slot, max_segments=max(slots, n) if slots else None)
        meta = meta.to("cuda")
        used = len(set(token_slot.tolist()))
        for g, (k, outs) in GROUPS.items():
            x = torch.randn(T, k, device="cuda", dtype=DT)
            y = torch.randn(T, sum(outs), device="cuda", dtype=DT)
            floor = {
                "shrink": (used * len(outs) * 16 * k * 2 + T * k * 2) / bw * 1e6,
                "expand": (used * sum(outs) * 16 * 2 + 2 * T * sum(outs) * 2) / bw * 1e6,
            }
            bufs = [lora_shrink(x, p.a[g], p.ranks[g], p.pages[g], meta) for p in pools]
            res = []
            for c in [None, *shrink_cfgs]:
                f = partial(_shrink_all, pools, x, g, meta, c)
                res.append((time_graph(f, len(pools)), "shrink", c))
            for c in [None, *expand_cfgs]:
                f = partial(_expand_all, pools, bufs, y, g, meta, c)
                res.append((time_graph(f, len(pools)), "expand", c))
            for op in ("shrink", "expand"):
                rows = sorted(
                    (r for r in res if r[1] == op and r[2] is not None), key=lambda r: r[0]
                )
                dflt = next(r[0] for r in res if r[1] == op and r[2] is None)
                print(
                    f"T={T:>3} {g:>7} {op}: floor {floor[op]:.1f} us, default {dflt:.1f} us "
                    f"({dflt / floor[op]:.2f}x)",
                    flush=True,
                )
                for t, _, c in rows:
                    print(f"    {t:7.1f} us {t / floor[op]:5.2f}x  {c}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,4,16,64,256")
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    ap.add_argument(
        "--slots", type=int, default=0, help="pad the metadata to this many segments (graphs)"
    )
    ap.add_argument("--sweep", action="store_true", help="time kernel configurations")
    ap.add_argument("--profile", type=int, default=0, help="per-kernel times at T tokens, distinct")
    ap.add_argument(
        "--variants", action="store_true", help="layer time per launch variant (VARIANTS)"
    )
    ap.add_argument(
        "--distinct-only", action="store_true", help="--variants: all-distinct adapters only"
    )
    ap.add_argument(
        "--adapters", type=int, default=0, help="--profile/--sweep: N adapters (0 = distinct)"
    )
    ap.add_argument(
        "--rank-split", action="store_true", help="mixed ranks: rank-bucketed shrink tiles or not"
    )
    ap.add_argument(
        "--seg-rank",
        action="store_true",
        help="segment path: partials and tiles sized by the step's rank vs the pool's (old)",
    )
    ap.add_argument("--pool-rank", type=int, default=64, help="--seg-rank: the pool's max rank")
    ap.add_argument(
        "--min-layers", type=int, default=MIN_LAYERS, help="layers per timed graph, at least"
    )
    args = ap.parse_args()
    globals()["MIN_LAYERS"] = args.min_layers
    n_ad = args.adapters or None
    if args.profile:
        profile(args.profile, n_ad, args.slots)
        return
    if args.sweep:
        sweep([int(t) for t in args.tokens.split(",")], n_ad, args.slots)
        return
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    bw = copy_bandwidth()
    print(
        f"device: {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s (read+write)"
        f"  metadata padded to {args.slots or 'no'} segments"
    )
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.variants:
        run_variants(tokens, bw, args.slots, args.distinct_only)
        return
    if args.rank_split:
        run_rank_split(tokens, bw, args.slots)
        return
    if args.seg_rank:
        run_seg_rank(tokens, bw, args.pool_rank)
        return
    cases = [("1 x r16", 1, False), ("8 x r16", 8, False), ("32 x r16", 32, False)]
    cases += [("distinct r16", None, False), ("distinct r8-64", None, True)]
    if args.quick:
        cases = [cases[0], cases[3], cases[4]]
    rows = []
    for name, n_ad, mixed in cases:
        pool_slots = max(tokens) if n_ad is None else n_ad
        for T in tokens:
            res, nbytes = run_case(T, n_ad, mixed, pool_slots, gen, args.slots)
            torch.cuda.empty_cache()
            floor_us = nbytes / bw * 1e6
            s, lo, bm = res["sgmv"], res["loop"], res["bmm"]
            rows.append((name, T, s, floor_us, lo, bm))
            print(
                f"{name:>15} T={T:>4}  sgmv {s:8.1f} us  floor {floor_us:7.1f}  x{s / floor_us:4.2f}"
                f"  loop {lo:8.1f} (x{lo / s:.1f})  gather+bmm {bm:8.1f} (x{bm / s:.1f})",
                flush=True,
            )
    print(
        "\n| case | tokens | SGMV us | floor us | SGMV/floor | loop us | loop/SGMV | gather+bmm us | bmm/SGMV |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, T, s, f, lo, bm in rows:
        print(
            f"| {name} | {T} | {s:.1f} | {f:.1f} | {s / f:.2f} | {lo:.1f} | {lo / s:.1f} | {bm:.1f} | {bm / s:.1f} |"
        )


if __name__ == "__main__":
    main()
