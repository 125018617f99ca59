"""Paged adapter memory (pages of rank rows): kernel cost, memory per adapter, and engine
throughput with 1 vs 2,000 adapters in S-LoRA's setting.

One command (H200, < 5 min): ``PYTHONPATH=. python benchmarks/bench_lora_paging.py``
(``--smoke``: tiny shapes on the CPU, for the test suite). Three parts:

1. kernels: shrink + expand of one Llama-3-8B layer's four projection groups, inside a CUDA
   graph over ``--layers`` layers (each its own weights, cold in L2), on the pool's paged
   layout (a page per projection of 8 rank rows, scattered over an arena) and on the padded
   layout of before (``a[slots, P, 64, in]``: the same kernels with one 64-row page per slot,
   so the pre-paging memory access), at ranks 8 / 16 / 32 / 64 and mixed, for decode batches of
   distinct adapters and a prefill batch over few adapters; with the bytes floor (x, the
   adapters' own A and B, y read and written, over the measured copy bandwidth).
2. memory: GPU bytes per resident adapter over its own bytes at each rank (q,v; q,k,v,o; all
   projections), and how many rank-8 adapters fit in the bytes of 128 padded rank-64 slots.
3. engine (``--engine-model``, Llama-2-7B shapes by default as in S-LoRA): q,k,v,o adapters
   of ranks 8/16/32/64 mixed, 2,000 keys drawn with Zipf(1) popularity, all host-cached before
   the timed run (``--weight-files`` distinct weight sets, read once each and shared in host
   memory under every key; GPU pages are per key), against 1 adapter of rank 32. GPU adapter
   memory: the engine's default (``lora_memory_fraction``), no slot count.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_throughput import preload, run_engine_case, warm_up
from common import copy_bandwidth, device_info, pick_device, table, write_json

from loraplex.engine.api import AdapterRef
from loraplex.engine.config import EngineConfig
from loraplex.engine.kernels import build_lora_meta, lora_expand, lora_shrink  # Triton on CUDA
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.lora.pool import GRANULE, PAGE_ROWS, page_bytes, plan_pages
from loraplex.engine.lora.slots import SlotTable
from loraplex.engine.lora.weights import GROUPS as MODULE_GROUPS
from loraplex.engine.model.presets import PRESETS
from loraplex.engine.model_runner import ModelRunner

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
RANKS = (8, 16, 32, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="kernels,memory,engine")
    p.add_argument("--layers", type=int, default=8, help="layers per kernel graph")
    p.add_argument("--engine-model", default="dummy:llama2-7b")
    p.add_argument("--adapters", type=int, default=2000)
    p.add_argument("--weight-files", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--lora-memory-bytes", type=int, default=None)
    p.add_argument("--load-workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and counts (CPU)")
    args = p.parse_args(argv)
    args.busy_steps, args.busy_window_at = 0, 0.3  # bench_throughput's run_engine_case reads these
    if args.smoke:
        args.engine_model, args.adapters, args.weight_files = "dummy:tiny", 40, 4
        args.num_requests, args.prompt_len, args.output_len = 12, 8, 4
        args.max_num_seqs, args.max_num_batched_tokens, args.layers = 8, 64, 2
    return args


# ---- 1. kernels ------------------------------------------------------------------------------


def layer_groups(cfg) -> dict[str, tuple[int, list[int]]]:
    h, i, kv, q = cfg.hidden_size, cfg.intermediate_size, cfg.kv_size, cfg.q_size
    return {"qkv": (h, [q, kv, kv]), "o": (q, [h]), "gate_up": (h, [i, i]), "down": (i, [h])}


class Layout:
    """One layer's weights of ``ranks`` adapters in one group: paged as the pool stores them
    (a page per projection of ``PAGE_ROWS`` rows of A then B, pages scattered over an arena
    with free pages between) or padded as before paging (``a[slots, P, 64, in]``,
    ``b[slots, N, 64]``: one 64-row page per slot and projection)."""

    def __init__(self, k, outs, ranks, padded, dtype, device, gen):
        S, P, N = len(ranks), len(outs), sum(outs)
        self.offsets = [0]
        for o in outs:
            self.offsets.append(self.offsets[-1] + o)
        self.ranks = torch.tensor(ranks, dtype=torch.int32)[:, None].expand(S, P).contiguous()
        self.ranks = self.ranks.to(device)
        if padded:
            self.a = torch.empty(S, P, 64, k, dtype=dtype, device=device).normal_(0.0, 0.02)
            self.b = torch.empty(S, N, 64, dtype=dtype, device=device).normal_(0.0, 0.02)
            self.pages = torch.arange(S, dtype=torch.int32, device=device)[:, None, None]
            self.pages = self.pages.expand(S, P, 1).contiguous()
            self.b_offsets = [0] * P
            return
        pr = PAGE_ROWS
        per = -(-(pr * k + max(outs) * pr) // GRANULE)
        need = [-(-r // pr) for r in ranks]
        order = torch.randperm(sum(need) * P * 5 // 4 + 1, generator=gen)  # some left free
        n = (len(order) + 1) * per * GRANULE + N * pr
        self.arena = torch.empty(n, dtype=dtype, device=device).normal_(0.0, 0.02)
        pages = torch.zeros(S, P, 64 // pr, dtype=torch.int32)
        it = iter(order.tolist())
        for s, n_pages in enumerate(need):
            for p in range(P):
                for j in range(n_pages):
                    pages[s, p, j] = next(it) * per
        units = len(order) * per
        self.a = self.arena.as_strided((units, P, pr, k), (GRANULE, 0, k, 1))
        self.b = self.arena.as_strided((units, N, pr), (GRANULE, pr, 1), pr * k)
        self.pages = pages.to(device)
        self.b_offsets = [-self.offsets[p] * pr for p in range(P)]


def kernel_case(cfg, T, ranks, token_slot, padded, layers, dtype, device, gen):
    """-> µs per layer of the four groups' shrink + expand in a CUDA graph of ``layers``."""
    groups = layer_groups(cfg)
    pools = [
        {g: Layout(k, outs, ranks, padded, dtype, device, gen) for g, (k, outs) in groups.items()}
        for _ in range(layers)
    ]  # fmt: skip
    xs = {g: torch.randn(T, k, generator=gen).to(dtype).to(device) for g, (k, _) in groups.items()}
    ys = {g: torch.zeros(T, sum(o), dtype=dtype, device=device) for g, (_, o) in groups.items()}
    meta = build_lora_meta(token_slot).to(device)

    def run() -> None:
        for pool in pools:
            for g, lay in pool.items():
                buf = lora_shrink(xs[g], lay.a, lay.ranks, lay.pages, meta)
                lora_expand(
                    buf, lay.b, lay.ranks, lay.pages, lay.offsets, meta, ys[g],
                    b_offsets=lay.b_offsets,
                )  # fmt: skip

    if device.type != "cuda":
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e6 / layers
    import triton

    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    ms = triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")
    return ms * 1e3 / layers


def floor_bytes(cfg, T, ranks, token_slot, elem) -> int:
    used = set(token_slot.tolist()) - {-1}
    total = 0
    for k, outs in layer_groups(cfg).values():
        n = sum(outs)
        total += T * k * elem + 2 * T * n * elem
        total += sum(ranks[s] * (len(outs) * k + n) * elem for s in used)
    return total


def kernel_part(args, device) -> list[dict]:
    cfg = PRESETS["tiny" if args.smoke else "llama3-8b"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elem = torch.empty((), dtype=dtype).element_size()
    bw = copy_bandwidth(device) if device.type == "cuda" else float("nan")
    gen = torch.Generator().manual_seed(args.seed)
    cases = []  # (label, T, adapters)
    for T in (8,) if args.smoke else (32, 128):
        cases.append((f"decode {T} distinct", T, T))
    cases.append(("prefill 2048 / 8 adapters" if not args.smoke else "prefill 32 / 2", *(
        (2048, 8) if not args.smoke else (32, 2))))  # fmt: skip
    rows = []
    for label, T, n_ad in cases:
        for rank in (8, "mixed") if args.smoke else (*RANKS, "mixed"):
            if rank == "mixed":
                ranks = [RANKS[i % 4] for i in range(n_ad)]
            else:
                ranks = [rank] * n_ad
            token_slot = (torch.arange(T) % n_ad).to(torch.int32)
            row = {"case": label, "rank": rank}
            for name, padded in (("paged_us", False), ("padded_us", True)):
                row[name] = kernel_case(
                    cfg, T, ranks, token_slot, padded, args.layers, dtype, device, gen
                )
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the case's layers and graph are gone
            row["paged/padded"] = row["paged_us"] / row["padded_us"]
            row["floor_us"] = floor_bytes(cfg, T, ranks, token_slot, elem) / bw * 1e6
            row["paged/floor"] = row["paged_us"] / row["floor_us"]
            rows.append(row)
            print(table([row], list(row)), flush=True)
    return rows


# ---- 2. memory ---------------------------------------------------------------------------


def memory_part(args) -> list[dict]:
    cfg = PRESETS["tiny" if args.smoke else "llama3-8b"]
    elem = 2
    pb = page_bytes(cfg, elem)
    pg = {g: -(-b // (GRANULE * elem)) * GRANULE * elem for g, b in pb.items()}
    from loraplex.engine.lora.weights import module_dims

    dims = module_dims(cfg)
    rows = []
    for targets_name, targets in (("q,v", ("q_proj", "v_proj")), ("q,k,v,o", QKVO), ("all", None)):
        mods = targets or tuple(m for ms in MODULE_GROUPS.values() for m in ms)
        for r in RANKS:
            own = cfg.num_layers * r * sum(sum(dims[m]) for m in mods) * elem
            held = sum(-(-r // PAGE_ROWS) * pg[m] for m in mods)
            rows.append({"targets": targets_name, "rank": r, "own_MiB": own / 2**20,
                         "gpu_MiB": held / 2**20, "gpu/own": held / own})  # fmt: skip
    padded_slot = sum(pb.values()) * (64 // PAGE_ROWS)
    budget = 128 * padded_slot
    t = SlotTable(plan_pages(cfg, budget, elem))
    need = {m: 1 for ms in MODULE_GROUPS.values() for m in ms}
    n = 0
    while t.fits(need):
        t.assign(f"a{n}", need)
        n += 1
    rows.append({"targets": "all", "rank": 8, "own_MiB": float("nan"), "gpu_MiB": budget / 2**20,
                 "gpu/own": float("nan"), "rank8_resident_in_128_padded_slots": n})  # fmt: skip
    print(table(rows, list(rows[-1])), flush=True)
    return rows


# ---- 3. engine -----------------------------------------------------------------------------


def engine_part(args, device) -> list[dict]:
    from common import write_peft_adapter

    preset = args.engine_model.removeprefix("dummy:")
    cfg = PRESETS[preset]
    t0 = time.perf_counter()
    runner = ModelRunner(
        args.engine_model,
        device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.prompt_len + args.output_len + 16,
        max_lora_rank=64,
        lora_memory_bytes=args.lora_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_bytes=64 * 2**20 if device.type == "cpu" else None,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
    )
    print(
        f"{args.engine_model}: runner in {time.perf_counter() - t0:.1f}s, "
        f"{runner.num_blocks} KV blocks, LoRA pages {runner.lora.nbytes() / 2**30:.2f} GiB, "
        f"{runner.num_slots} slots",
        flush=True,
    )
    # one host copy per weight file, shared by every key that names it (GPU pages are per key)
    runner.read_adapter = functools.lru_cache(maxsize=None)(runner.read_adapter)  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, cfg.vocab_size, (args.num_requests, args.prompt_len), generator=gen)
    ids_l = ids.tolist()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lpx-paging-") as tmp:
        files = {}
        for f in range(args.weight_files):
            r = RANKS[f % 4]
            files[f] = write_peft_adapter(Path(tmp) / f"w{f}", cfg, r, seed=100 + f, targets=QKVO)
        one = write_peft_adapter(Path(tmp) / "one", cfg, 32, seed=7, targets=QKVO)
        for n in (1, args.adapters):
            refs = (
                [AdapterRef("one", str(one))]
                if n == 1
                else [AdapterRef(f"k{i}", str(files[i % args.weight_files])) for i in range(n)]
            )
            engine = LLMEngine(
                runner,
                EngineConfig(
                    max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    max_model_len=runner.max_model_len,
                    max_lora_rank=64,
                    max_cpu_loras=n + 1,
                    adapter_load_workers=args.load_workers,
                    seed=args.seed,
                ),
            )
            warm_up(engine, ids_l[:4], [None, refs[0], None, refs[-1]])
            load_s = preload(engine, refs)
            row = run_engine_case(args, engine, ids_l, refs)
            row["preload_s"] = load_s
            row["resident_end"] = len(engine.slots.resident)
            row["pages_used_end"] = engine.slots.pages.pages_used()
            engine.shutdown()
            rows.append(row)
            print(table([row], list(row)), flush=True)
    base = rows[0]["out_tok_s"]
    for r in rows:
        r["vs_1_adapter"] = r["out_tok_s"] / base
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.smoke)
    parts = {p.strip() for p in args.parts.split(",")}
    result: dict = {"bench": "lora_paging", "args": vars(args), "info": device_info(device)}
    if "memory" in parts:
        result["memory"] = memory_part(args)
    if "kernels" in parts:
        result["kernels"] = kernel_part(args, device)
        print(
            "\nkernels (µs per layer, 4 groups)\n"
            + table(result["kernels"], list(result["kernels"][0]))
        )
    if "engine" in parts:
        result["engine"] = engine_part(args, device)
        cols = ["adapters", "distinct_used", "seconds", "out_tok_s", "vs_1_adapter", "mean_batch"]
        cols += ["slot_evictions", "loads_in_run", "preload_s", "resident_end"]
        print("\nengine\n" + table(result["engine"], cols))
        mixed = [r for r in result.get("kernels", []) if r["rank"] == "mixed"]
        if mixed:
            print(f"paged/padded (mixed): {statistics.mean(r['paged/padded'] for r in mixed):.3f}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
