"""Offline throughput of the engine with many adapters, against itself without adapters and
against Hugging Face transformers + PEFT on the same GPU.

One command: ``PYTHONPATH=. python benchmarks/bench_throughput.py`` (CUDA; ``--smoke`` runs
``dummy:tiny`` on the CPU with a handful of requests). Workload: ``--num-requests`` requests
(1,000), random prompt ids of ``--prompt-len`` (256) tokens, ``--output-len`` (128) output
tokens each (``ignore_eos``, greedy), all queued at once; each request's adapter is drawn with
Zipf(``--zipf``) popularity from N adapters, N in ``--adapters`` (0 = no adapter: the baseline).

One :class:`ModelRunner` (weights, KV pool, LoRA slot pool, CUDA graphs) serves every case;
each case gets a fresh :class:`LLMEngine` over it (scheduler, block manager, slot table and
adapter loader start empty). Adapters are rank-16 PEFT directories on local disk read by the
engine's own loader; ``--weight-files`` distinct random weight files are written and adapter i
reads file ``i % weight-files`` under its own key (the engine keys slots, host cache and KV
prefixes by key, so it treats every key as a distinct adapter; only the bytes repeat).
Before a case is timed its adapters are loaded into the host cache (``--preload``; the
load rate is reported); GPU slot writes and evictions happen inside the timed run.

Each case also reports what its steps read of adapter weights (the engine's
``lora_step_adapters`` / ``lora_step_bytes``: each launched step, its distinct adapters' A
and B) and the bound those bytes put on its ratio to the no-adapter case:
``bytes_bound = T0 / (T0 + bytes / BW)``, ``T0`` the no-adapter seconds, ``BW`` the device
copy bandwidth measured at the start (``--bandwidth-gbs``; 4200 GB/s nominal off CUDA).

The HF baseline (``--hf-adapters``, default 32) builds the same architecture in
transformers with random bf16 weights, adds N PEFT LoRA adapters and runs ``generate`` with
``adapter_names=`` (PEFT's mixed-adapter batch) on ``--hf-requests`` requests of the same
shape in batches of ``--hf-batch``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ALL_TARGETS,
    StepEvents,
    bound_bandwidth,
    bytes_bound,
    device_info,
    hf_llama_config,
    pick_device,
    table,
    write_json,
    write_peft_adapter,
    zipf_indices,
)

from loraplex.engine.api import AdapterRef, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.prefill_graphs import PrefillGraphs
from loraplex.engine.model.presets import PRESETS
from loraplex.engine.model_runner import ModelRunner
from loraplex.heap import freeze_heap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dummy:llama3-8b")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--adapters",
        default="0,1,32,512",
        help="cases; 0 = no adapters; a case may repeat; suffix i (e.g. 32i): LoRA in line, "
        "without the decode side stream (the baseline of that design); suffix s (0s, 32s): "
        "synchronous steps (no async scheduling); suffix u (0u, 32u): the heap not frozen "
        "(the other cases run, as the engine server does, with gc.freeze() after warm-up); "
        "suffix f (32f): the gate/up LoRA of prefill and mixed steps unfused (expand, then "
        "the activation: the layout before lora_silu_and_mul; the prefill graphs recaptured)",
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--max-lora-rank", type=int, default=None, help="the engine's max_lora_rank (--rank)"
    )
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--weight-files", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--max-loras", type=int, default=128, help="cap on adapters resident on GPU (deprecated)"
    )
    p.add_argument("--load-workers", type=int, default=8)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument(
        "--lora-memory-fraction",
        type=float,
        default=0.2,
        help="GPU memory for adapter pages, of what the weights leave (MoE: large pages)",
    )
    p.add_argument(
        "--host-lora-memory-fraction",
        type=float,
        default=0.2,
        help="host memory for the adapter cache, of the machine's",
    )
    p.add_argument("--no-preload", dest="preload", action="store_false")
    p.add_argument("--hf-adapters", default="32", help="HF+PEFT cases ('' = skip HF)")
    p.add_argument("--hf-requests", type=int, default=32)
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--busy-steps", type=int, default=40, help="steps in the GPU-busy window (-1: all)"
    )
    p.add_argument(
        "--busy-window-at", type=float, default=0.3, help="where the window starts (of the run)"
    )
    p.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=None,
        help="GB/s of the bytes bound (default: measured on CUDA, else 4200 nominal)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--profile", default=None, help="dir: cProfile of a short 32-adapter case")
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
    p.add_argument(
        "--launch-variant",
        default=None,
        help="run every case under this variant of sweep_decode_lora.py's LoRA launch configs "
        '(e.g. "before 12-05": the configs before the 12-05 rules; not "in line")',
    )
    p.add_argument(
        "--moe-lora-beside",
        action="store_true",
        help="MoE: decode steps' expert LoRA beside the grouped GEMMs (the model's "
        "moe_lora_beside, off by default)",
    )
    p.add_argument("--smoke", action="store_true", help="dummy:tiny, tiny counts (CPU)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.num_requests, args.prompt_len, args.output_len = "dummy:tiny", 24, 20, 8
        args.adapters, args.weight_files, args.max_num_seqs = "0,1,4,16,4u,4f", 2, 8
        args.max_num_batched_tokens, args.max_loras, args.load_workers = 64, 4, 2
        args.hf_adapters, args.hf_requests, args.hf_batch = "4", 4, 4
    return args


def make_runner(args, device: torch.device) -> ModelRunner:
    return ModelRunner(
        args.model,
        device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        block_size=16,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.prompt_len + args.output_len + 16,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank or args.rank,
        gpu_memory_utilization=args.gpu_memory_utilization,
        lora_memory_fraction=args.lora_memory_fraction,
        kv_cache_bytes=64 * 2**20 if device.type == "cpu" else None,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        quantization=args.quantization,
        fp8_w8a8_min_tokens=args.fp8_w8a8_min_tokens,
        kernel_config_dir=Path(args.kernel_config_dir) if args.kernel_config_dir else None,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def make_engine(
    args, runner: ModelRunner, n_adapters: int, async_scheduling: bool = True
) -> LLMEngine:
    cfg = EngineConfig(
        async_scheduling=async_scheduling,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=runner.max_model_len,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank or args.rank,
        max_cpu_loras=max(args.max_loras, n_adapters),
        adapter_load_workers=args.load_workers,
        host_lora_memory_fraction=args.host_lora_memory_fraction,
        seed=args.seed,
    )
    return LLMEngine(runner, cfg)


def prompts(args, vocab: int, n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(3, vocab, (n, args.prompt_len), generator=gen).tolist()


def adapter_refs(args, cfg, n: int, root: Path) -> list[AdapterRef]:
    files = []
    for f in range(min(n, args.weight_files)):
        d = root / f"w{f}"
        if not d.exists():
            write_peft_adapter(d, cfg, args.rank, seed=1000 + f)
        files.append(d)
    return [AdapterRef(f"bench-{n}-{i}", str(files[i % len(files)])) for i in range(n)]


def preload(engine: LLMEngine, refs: list[AdapterRef]) -> float:
    """Load every adapter into the engine's host cache; -> seconds taken."""
    t0 = time.perf_counter()
    for ref in refs:
        engine.loader.start(ref)
    while engine.loader.num_loading:
        time.sleep(0.005)
        failed = engine.loader.collect()
        if failed:
            raise RuntimeError(f"adapter load failed: {failed[0]}")
    took = time.perf_counter() - t0
    print(f"preloaded {len(refs)} adapters in {took:.1f}s", flush=True)
    return took


def warm_up(engine: LLMEngine, ids: list[list[int]], refs: list[AdapterRef | None]) -> None:
    """Short requests (4 tokens) through the whole engine path, prompt ``ids[i]`` with
    adapter ``refs[i]`` (None: the base model); steps until all are done."""
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for i, (p, ref) in enumerate(zip(ids, refs, strict=True)):
        engine.add_request(Request(f"w{i}", p, params, ref))
    while engine.has_unfinished():
        engine.step()
        if not engine.last_step_ran:
            time.sleep(0.005)


def run_engine_case(args, engine: LLMEngine, ids: list[list[int]], refs: list[AdapterRef]):
    """Queue every request, step to the end. -> dict of the case's numbers."""
    n = len(ids)
    picks = zipf_indices(len(refs), n, args.zipf, seed=args.seed) if refs else [None] * n
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    before = engine.stats()
    busy = StepEvents(engine.runner.device)
    busy.attach(engine)
    whole = args.busy_steps < 0  # the whole run
    busy_from = 0 if whole else int(args.busy_window_at * n * args.output_len / args.max_num_seqs)
    t0 = time.perf_counter()
    for i, (p, a) in enumerate(zip(ids, picks, strict=True)):
        engine.add_request(Request(f"r{i}", p, params, None if a is None else refs[a]))
    out_tokens, finished, seqs_sum, steps = 0, 0, 0, 0
    busy_t0 = busy_wall = None
    while engine.has_unfinished():
        if args.busy_steps and steps == busy_from and busy_t0 is None:
            busy.start()
            busy_t0 = time.perf_counter()
        elif busy_t0 is not None and busy_wall is None and steps == busy_from + args.busy_steps:
            busy.stop()
            busy_wall = time.perf_counter() - busy_t0
        for o in engine.step():  # the core's outputs: token ids (text is the client's work)
            for c in o.choices:
                out_tokens += len(c.token_ids)
            if o.finished:
                finished += 1
                if o.error:
                    raise RuntimeError(f"{o.request_id}: {o.error.message}")
        if engine.last_step_ran:
            steps += 1
            seqs_sum += engine.stats().last_batch_seqs
        else:
            time.sleep(0.001)  # waiting on adapter loads only
    elapsed = time.perf_counter() - t0
    window = args.busy_steps
    if whole and busy_t0 is not None:
        busy.stop()
        busy_wall, window = time.perf_counter() - busy_t0, steps
    st = engine.stats()
    if finished != n or out_tokens != n * args.output_len:
        raise RuntimeError(f"{finished}/{n} finished, {out_tokens} output tokens")
    launched = max(st.steps - before.steps, 1)
    lora_bytes = st.lora_step_bytes - before.lora_step_bytes
    return {
        "adapters": len(refs),
        "distinct_used": len({a for a in picks if a is not None}),
        "requests": n,
        "seconds": elapsed,
        "out_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + n * args.prompt_len) / elapsed,
        "steps": steps,
        "mean_batch": seqs_sum / max(steps, 1),
        "preemptions": st.preemptions - before.preemptions,
        "slot_evictions": st.adapter_evictions - before.adapter_evictions,
        "loads_in_run": st.adapter_loads - before.adapter_loads,
        # what the LoRA kernels read: each launched step, its distinct adapters' A and B
        "adapters_per_step": (st.lora_step_adapters - before.lora_step_adapters) / launched,
        "adapter_gb_per_step": lora_bytes / launched / 1e9,
        "lora_step_bytes": lora_bytes,
        "gpu_busy": busy.fraction,  # the steps' GPU spans over the window (StepEvents)
        "busy_breakdown": busy.breakdown,
        "busy_ms_per_step": busy.span_ms / window if window else float("nan"),
        "busy_window_wall_ms_per_step": (
            float("nan") if busy_wall is None else busy_wall * 1000 / window
        ),
    }


def run_hf_case(args, model_cfg, device, n_adapters: int, ids: list[list[int]]) -> dict:
    """HF transformers + PEFT mixed-adapter ``generate`` (greedy, fixed output length)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(hf_llama_config(model_cfg), dtype=dtype).eval()
    holder = {"model": base}
    names: list[str] | None = None
    if n_adapters:
        lcfg = LoraConfig(
            r=args.rank, lora_alpha=args.rank, target_modules=list(ALL_TARGETS), lora_dropout=0.0
        )
        model = get_peft_model(base, lcfg, adapter_name="a0")  # wraps base in place
        for i in range(1, n_adapters):
            model.add_adapter(f"a{i}", lcfg)
        with torch.no_grad():  # PEFT starts B at zero; make every adapter change the output
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.normal_(std=p.shape[1] ** -0.5)
                elif "lora_B" in name:
                    p.normal_(std=0.1 * p.shape[1] ** -0.5)
        picks = zipf_indices(n_adapters, len(ids), args.zipf, seed=args.seed)
        names = [f"a{i}" for i in picks]
        model.eval()
        holder["model"] = model

    def generate(batch_ids: list[list[int]], batch_names: list[str] | None, new: int):
        x = torch.tensor(batch_ids, device=device)
        kw = {"adapter_names": batch_names} if batch_names is not None else {}
        with torch.no_grad():
            out = holder["model"].generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                **kw,
            )
        return out.shape[1] - x.shape[1]

    generate(ids[:2], names[:2] if names else None, 4)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out_tokens = 0
    for s in range(0, len(ids), args.hf_batch):
        chunk = ids[s : s + args.hf_batch]
        got = generate(chunk, names[s : s + args.hf_batch] if names else None, args.output_len)
        out_tokens += got * len(chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    holder.clear()
    del base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "adapters": n_adapters,
        "requests": len(ids),
        "batch": args.hf_batch,
        "seconds": elapsed,
        "out_tok_s": out_tokens / elapsed,
    }


def profile_case(args, runner: ModelRunner, ids: list[list[int]], root: Path) -> None:
    """cProfile of the engine's step loop (host side) over a short 32-adapter case."""
    import cProfile
    import io
    import pstats

    n = min(32, max(int(x.strip().rstrip("isu")) for x in args.adapters.split(",") if x.strip()))
    engine = make_engine(args, runner, n)
    refs = adapter_refs(args, runner.config, n, root)
    preload(engine, refs)
    prof = cProfile.Profile()
    prof.enable()
    row = run_engine_case(args, engine, ids[: max(len(ids) // 5, 1)], refs)
    prof.disable()
    engine.shutdown()
    buf = io.StringIO()
    buf.write(f"{row}\n\n")
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(30)
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput_cprofile.txt").write_text(buf.getvalue())
    print(f"cProfile ({row['out_tok_s']:.0f} out tok/s under the profiler) written to {out}")


def run_engine_cases(args, device: torch.device, cases: list[str], ids) -> list[dict]:
    """Every engine case over one runner; the runner is freed on return."""
    t0 = time.perf_counter()
    runner = make_runner(args, device)
    cfg = runner.config
    if args.moe_lora_beside:
        runner.model.moe_lora_beside = True
        if runner.graphs is not None:  # the decode graphs again, with the flag
            with torch.inference_mode():
                runner.graphs.capture()
    print(
        f"{args.model} on {device}: runner ready in {time.perf_counter() - t0:.1f}s "
        f"({runner.num_blocks} KV blocks, {args.max_loras} LoRA slots, "
        f"graphs={'on' if runner.graphs is not None else 'off'})",
        flush=True,
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lpx-bench-") as tmp:
        # warm-up: a few short requests through the whole engine path (with and without LoRA)
        warm = make_engine(args, runner, 1)
        (ref,) = adapter_refs(args, cfg, 1, Path(tmp))
        warm_up(warm, ids[:4], [None, ref, None, ref])
        warm.shutdown()
        del warm
        # as the engine server's step loop does once the engine is ready (loraplex/heap.py):
        # a full collection then walks only what was made since, not the model's objects
        freeze_heap()

        side = runner.model.side_stream
        for case in cases:
            n, in_line, sync = int(case.rstrip("isuf")), "i" in case, "s" in case
            set_fused_act(runner, "f" not in case)
            unfrozen = "u" in case
            if unfrozen:  # the startup heap back in the collector's reach, for this case
                gc.unfreeze()
            if side is not None and (runner.model.side_stream is None) != in_line:
                runner.model.side_stream = None if in_line else side
                if runner.graphs is not None:
                    runner.graphs.capture()  # the decode graphs hold the stream layout
            engine = make_engine(args, runner, n, async_scheduling=not sync)
            refs = adapter_refs(args, cfg, n, Path(tmp))
            load_s = preload(engine, refs) if (refs and args.preload) else 0.0
            row = run_engine_case(args, engine, ids, refs)
            row["steps_mode"] = "sync" if sync else "async"
            row["heap"] = "default" if unfrozen else "frozen"
            if unfrozen:
                freeze_heap()
            row["lora"] = ("in line" if in_line else "beside") + (
                ", unfused" if "f" in case else ""
            )
            row["preload_s"] = load_s
            row["loads_per_s"] = len(refs) / load_s if load_s else float("nan")
            engine.shutdown()
            rows.append(row)
            print(table([row], [k for k in row if k != "busy_breakdown"]), flush=True)
            write_json(args.json, {"bench": "throughput", "partial": True, "engine": rows})

        if args.profile:
            profile_case(args, runner, ids, Path(tmp))

    gc.unfreeze()  # the runner's cycles collectable again: its memory goes on return
    return rows


def set_fused_act(runner, on: bool) -> None:  # type: ignore[no-untyped-def]
    """The gate/up expand inside the activation (``LlamaModel.fuse_lora_act``) on or off; the
    prefill graphs, which hold the kernels they were captured with, captured again."""
    if runner.model.fuse_lora_act == on:
        return
    runner.model.fuse_lora_act = on
    if runner.prefill_graphs is not None:
        runner.prefill_graphs = None
        gc.collect()
        torch.cuda.empty_cache()
        with torch.inference_mode():
            runner.prefill_graphs = PrefillGraphs(
                runner.model,
                runner.kv_caches,
                runner.lora,
                max_tokens=runner.prefill_graph_tokens,
            )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.smoke)
    if args.launch_variant:  # before the runner captures its graphs
        import sweep_decode_lora as sw

        variants = dict(sw.VARIANTS)
        v = variants.get(args.launch_variant)
        if v is None or v.get("in_line"):
            raise SystemExit(
                f"--launch-variant: one of {sorted(n for n in variants if n != 'in line')}"
            )
        sw.S.lora_shrink, sw.E.lora_expand = sw.kernels_for(v)
        print(f"LoRA launch configs: {args.launch_variant}", flush=True)
    cases = [x.strip() for x in args.adapters.split(",") if x.strip()]
    hf_cases = [int(x) for x in args.hf_adapters.split(",") if x != ""]
    if not args.model.startswith("dummy:"):
        raise SystemExit("--model must be a dummy:<preset> (random weights; the HF baseline too)")
    cfg = PRESETS[args.model.removeprefix("dummy:")]
    ids = prompts(args, cfg.vocab_size, args.num_requests)
    bw_gbs, bw_source = bound_bandwidth(device, args.bandwidth_gbs)  # before the KV pool
    print(f"bytes bound at {bw_gbs:.0f} GB/s, {bw_source}", flush=True)

    rows = run_engine_cases(args, device, cases, ids)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        print(f"GPU memory after the engine: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")

    # against the no-adapter case (the mean when it ran more than once), same run
    base_runs = [
        r["out_tok_s"]
        for r in rows
        if r["adapters"] == 0 and r["steps_mode"] == "async" and r["heap"] == "frozen"
    ] or [r["out_tok_s"] for r in rows if r["adapters"] == 0]
    base_tok = statistics.mean(base_runs) if base_runs else float("nan")
    base_s = args.num_requests * args.output_len / base_tok  # T0: its mean seconds
    for r in rows:
        r["vs_no_adapter"] = r["out_tok_s"] / base_tok
        r["bytes_bound"] = bytes_bound(base_s, r["lora_step_bytes"], bw_gbs)

    hf_rows = []
    for n in hf_cases:
        hf_ids = ids[: args.hf_requests]
        hf = run_hf_case(args, cfg, device, n, hf_ids)
        same = next((r for r in rows if r["adapters"] == n and r["lora"] == "beside"), None)
        hf["engine_over_hf"] = same["out_tok_s"] / hf["out_tok_s"] if same else float("nan")
        hf_rows.append(hf)
        print(table([hf], list(hf)), flush=True)

    cols = ["adapters", "lora", "steps_mode", "heap", "distinct_used", "seconds", "out_tok_s"]
    cols += ["vs_no_adapter", "bytes_bound", "adapters_per_step", "adapter_gb_per_step"]
    cols += ["mean_batch", "gpu_busy", "busy_ms_per_step"]
    cols += ["steps", "preemptions", "slot_evictions", "loads_in_run", "preload_s"]
    print("\nengine\n" + table(rows, cols))
    for r in rows:
        for kind, d in (r.get("busy_breakdown") or {}).items():
            if d.get("steps"):
                print(f"  {r['adapters']} {r['steps_mode']} {kind} steps: {d['steps']}, GPU idle before each "
                      f"{d['gap_ms']:.2f} ms, GPU {d['gpu_ms']:.2f} ms, host launch "
                      f"{d['launch_ms']:.2f} ms, host between steps {d['between_ms']:.2f} ms")  # fmt: skip
    if hf_rows:
        print("\nHF transformers + PEFT\n" + table(hf_rows, list(hf_rows[0])))
    result = {
        "bench": "throughput",
        "args": vars(args),
        "info": device_info(device),
        "copy_bandwidth_GBps": bw_gbs,
        "copy_bandwidth_source": bw_source,
        "engine": rows,
        "hf_peft": hf_rows,
    }
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
