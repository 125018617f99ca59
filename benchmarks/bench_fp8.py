"""FP8 base weights against bf16 on one GPU: GEMMs, the kernel-config sweep, decode, prefill,
quality. One command (CUDA, compute capability >= 8.9), JSON to ``--json``:

    PYTHONPATH=. python benchmarks/bench_fp8.py --json $OUT/fp8.json

Sections (``--sections``, all by default):

- ``gemm``: the linear layers of ``--model``'s shape (Llama-3-8B: qkv, o, gate_up, down), all
  layers with distinct weights (nothing stays in L2), one CUDA graph per case, at M = 1, 8,
  32, 64, 128, 256 tokens: bf16 ``F.linear``; the weight-only FP8 kernel with its default
  config and with the tuned one; the same Triton GEMM with FP8 activations quantized inside
  it (``a8``, per token and K step); W8A8 (Triton per-token quantization +
  ``torch._scaled_mm``); ``_scaled_mm`` alone on pre-quantized activations. Each against its
  bytes floor (2- or 1-byte weights) at ``--floor-bw`` (4.2 TB/s) and at the copy bandwidth
  measured here; the token count from which FP8 activations win is the suggested
  ``LORAPLEX_FP8_W8A8_MIN_TOKENS``.
- ``decode``: one decode step (captured graph + LM head) at ``--batch`` (32) sequences of
  ``--context`` (512) tokens, each with its own rank-``--rank`` adapter, and without adapters:
  bf16 vs FP8 (the default: FP8 activations at every step; and weight-only), each against its
  own floor.
- ``prefill``: tokens/s of ``--prefill-seqs`` x ``--prefill-len`` tokens, bf16 vs FP8 (W8A8 and
  weight-only).
- ``quality``: ``--prompts`` prompts, ``--steps`` tokens each, greedy in bf16; the FP8
  model fed the same tokens: agreement of its greedy choice with bf16's per position, and the
  mean KL(bf16 || fp8) of the next-token distributions; also with an adapter (random, rank
  ``--rank``) on every prompt. On a ``dummy:`` model the weights are random (a pipeline check,
  not a quality figure): ``--quality-model`` names a real checkpoint (an HF directory, a
  ``.gguf``, ``default``) to run this section on instead, quantized at load. Prompts
  (``--prompt-text``): on a real model, windows of English prose from this repository's
  README and docs, tokenized by the model's tokenizer (random token ids put a real model
  where its top two tokens are near ties, so greedy agreement measures the prompts more than
  the quantization: 0.90 on SmolLM2 there); on a ``dummy:`` model, random token ids.

The FP8 runner is built with a kernel-config cache directory (``--kernel-config-dir``), so its
warm-up runs the launch-config sweep (its time and results are in the JSON under ``tune``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import decode_batch, gpu_step_seconds
from common import (
    adapter_bytes,
    base_step_bytes,
    copy_bandwidth,
    device_info,
    graph_median_ms,
    kv_read_bytes,
    pick_device,
    sync,
    table,
    write_json,
    write_peft_adapter,
)

from loraplex.engine.batch import ScheduledBatch, SeqChunk
from loraplex.engine.kernels._triton import num_sms
from loraplex.engine.kernels.fp8_linear import (
    default_w8a16_config,
    fp8_linear_w8a8,
    fp8_linear_w8a16,
    quantize_rows,
)
from loraplex.engine.model.config import ModelConfig
from loraplex.engine.model.fp8 import Fp8Weight, quantize_per_channel
from loraplex.engine.model.llama import fp8_shape_key
from loraplex.engine.model_runner import ModelRunner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dummy:llama3-8b")
    p.add_argument("--sections", default="gemm,decode,prefill,quality")
    p.add_argument("--ms", default="1,8,32,64,128,256", help="GEMM token counts")
    p.add_argument("--floor-bw", type=float, default=4.2e12, help="bytes/s of the floor")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prefill-seqs", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument(
        "--quality-model", default=None, help="quality on this checkpoint (default: --model)"
    )
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument(
        "--prompt-text",
        choices=("auto", "docs", "random"),
        default="auto",
        help="quality prompts: prose from README.md and docs/ (auto: unless the model is dummy:)",
    )
    p.add_argument("--steps", type=int, default=16, help="quality: tokens per prompt")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--fp8-w8a8-min-tokens", type=int, default=1)
    p.add_argument("--kernel-config-dir", default=None, help="default: a temporary directory")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="dummy:tiny on the CPU, no gemm")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.sections, args.batch, args.context = (
            "dummy:tiny",
            "decode,prefill,quality",
            4,
            40,
        )
        args.prefill_seqs, args.prefill_len, args.prompts, args.prompt_len = 2, 64, 6, 8
        args.steps, args.reps = 4, 4
    return args


# ---- GEMMs ---------------------------------------------------------------------------------


def gemm_section(args, device: torch.device, bw: float, tuned: dict, cfg: ModelConfig) -> dict:
    shapes = {
        "qkv": (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size),
        "o": (cfg.hidden_size, cfg.q_size),
        "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size),
        "down": (cfg.hidden_size, cfg.intermediate_size),
    }
    L = cfg.num_layers
    gen = torch.Generator(device=device).manual_seed(0)
    dense: list[list[torch.Tensor]] = []
    fp8: list[list[Fp8Weight]] = []
    for _ in range(L):
        row_d, row_q = [], []
        for n, k in shapes.values():
            w = torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
            row_d.append(w)
            row_q.append(quantize_per_channel(w))
        dense.append(row_d)
        fp8.append(row_q)
    params = L * sum(n * k for n, k in shapes.values())
    print(f"gemm: {L} layers x {list(shapes)}: {params / 1e9:.2f} G weights", flush=True)

    def graph_ms(fn) -> float:
        return graph_median_ms(fn, device, args.reps)

    rows = []
    for m in [int(x) for x in args.ms.split(",")]:
        xs = {
            k: torch.randn(m, kk, device=device, dtype=torch.bfloat16)
            for k, (_, kk) in shapes.items()
        }
        names = list(shapes)
        xq = {k: quantize_rows(x) for k, x in xs.items()}

        def bf16(names=names, xs=xs) -> None:
            for layer in dense:
                for name, w in zip(names, layer, strict=True):
                    F.linear(xs[name], w)

        def w8a16(use_tuned: bool, names=names, xs=xs, m=m) -> None:
            for layer in fp8:
                for name, w in zip(names, layer, strict=True):
                    c = tuned.get(fp8_shape_key(w, m)) if use_tuned else None
                    fp8_linear_w8a16(xs[name], w.qweight, w.scale, None, None, c)

        def a8(use_tuned: bool, names=names, xs=xs, m=m) -> None:
            for layer in fp8:
                for name, w in zip(names, layer, strict=True):
                    c = tuned.get(fp8_shape_key(w, m, True)) if use_tuned else None
                    c = c or default_w8a16_config(m, *w.shape, None, True, num_sms(device), True)
                    fp8_linear_w8a16(xs[name], w.qweight, w.scale, None, None, c)

        def w8a8(names=names, xs=xs) -> None:
            for layer in fp8:
                for name, w in zip(names, layer, strict=True):
                    fp8_linear_w8a8(xs[name], w.qweight, w.scale)

        def mm_only(names=names, xq=xq, m=m) -> None:
            for layer in fp8:
                for name, w in zip(names, layer, strict=True):
                    q, s = xq[name]
                    torch._scaled_mm(q, w.qweight.t(), scale_a=s, scale_b=w.scale.view(1, -1),
                                     out_dtype=torch.bfloat16)  # fmt: skip

        floor2 = (2 * params + 2 * m * sum(k for _, k in shapes.values()) * L) / args.floor_bw
        floor1 = (params + 2 * m * sum(k for _, k in shapes.values()) * L) / args.floor_bw
        row = {"M": m, "floor_bf16_ms": floor2 * 1e3, "floor_fp8_ms": floor1 * 1e3}
        row["bf16_ms"] = graph_ms(bf16)
        row["w8a16_ms"] = graph_ms(lambda: w8a16(False))
        row["w8a16_tuned_ms"] = graph_ms(lambda: w8a16(True)) if tuned else float("nan")
        row["a8_ms"] = graph_ms(lambda: a8(bool(tuned)))
        row["w8a8_ms"] = graph_ms(w8a8)
        row["scaled_mm_only_ms"] = graph_ms(mm_only)
        best_fp8 = min(v for k, v in row.items()
                       if k in ("w8a16_ms", "w8a16_tuned_ms", "a8_ms", "w8a8_ms") and v == v)  # fmt: skip
        row["bf16/floor"] = row["bf16_ms"] / row["floor_bf16_ms"]
        row["best_fp8/floor1"] = best_fp8 / row["floor_fp8_ms"]
        row["bf16/best_fp8"] = row["bf16_ms"] / best_fp8
        row["measured_bw_floor_fp8_ms"] = floor1 * args.floor_bw / bw * 1e3
        print(table([row], list(row)), flush=True)
        rows.append(row)
    # the smallest M from which FP8 activations (either path) beat the weight-only kernel at
    # every larger M
    wo = [min(r["w8a16_ms"], r["w8a16_tuned_ms"] if tuned else r["w8a16_ms"]) for r in rows]
    suggest = None
    for i in range(len(rows)):
        if all(min(rows[j]["a8_ms"], rows[j]["w8a8_ms"]) < wo[j] for j in range(i, len(rows))):
            suggest = rows[i]["M"]
            break
    dense.clear()
    fp8.clear()
    gc.collect()
    torch.cuda.empty_cache()
    return {"shapes": shapes, "layers": L, "rows": rows, "suggested_w8a8_min_tokens": suggest}


# ---- runners -------------------------------------------------------------------------------


def make_runner(args, device, quantization: str | None, config_dir: Path | None) -> ModelRunner:
    per_seq = -(-(max(args.context, args.prefill_len, args.prompt_len + args.steps) + 1) // 16)
    n_seq = max(args.batch, args.prefill_seqs, 32)
    t0 = time.perf_counter()
    r = ModelRunner(
        args.model,
        device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        block_size=16,
        max_num_seqs=max(args.batch, 64),  # tuned token buckets 16, 32, 64
        max_model_len=per_seq * 16,
        max_loras=args.batch,
        max_lora_rank=args.rank,
        # 32 rank-16 adapters of an 8B model: 2.5 GiB (CPU: the runner sizes it)
        lora_memory_bytes=4 << 30 if device.type == "cuda" else None,
        num_blocks=n_seq * per_seq + 1,
        max_num_batched_tokens=args.prefill_seqs * args.prefill_len,
        seed=0,
        quantization=quantization,
        fp8_w8a8_min_tokens=args.fp8_w8a8_min_tokens,
        kernel_config_dir=config_dir,
    )
    print(
        f"runner {quantization or 'bf16'}: {r.loaded.weights.nbytes() / 2**30:.2f} GiB weights, "
        f"built in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return r


def load_adapters(args, runner: ModelRunner, tmp: Path) -> None:
    files = [
        runner.read_adapter(write_peft_adapter(tmp / f"w{i}", runner.config, args.rank, seed=i))
        for i in range(4)
    ]
    for s in range(runner.num_slots):
        runner.write_slot(s, files[s % len(files)])


def decode_rows(args, runner: ModelRunner, bw: float, label: str) -> list[dict]:
    cfg = runner.config
    elem = 2
    per_seq = -(-(args.context + 1) // 16)
    w_bytes = runner.loaded.weights.nbytes()
    a_bytes = adapter_bytes(cfg, args.rank, elem)
    rows = []
    for mode, slots in (("base", [-1] * args.batch), ("distinct", list(range(args.batch)))):
        n_ad = len({s for s in slots if s >= 0})
        batch = decode_batch(args.batch, args.context, per_seq, slots)
        for _ in range(3):
            runner.execute(batch)
        gpu = gpu_step_seconds(runner, batch, n_ad > 0, args.reps)
        floor_bytes = (
            base_step_bytes(cfg, w_bytes, args.batch, elem)
            + n_ad * a_bytes
            + kv_read_bytes(cfg, args.batch, args.context, elem)
        )
        row = {
            "weights": label,
            "mode": mode,
            "batch": args.batch,
            "gpu_ms": gpu * 1e3 if gpu is not None else float("nan"),
            "floor_ms": floor_bytes / bw * 1e3,
            "floor_4.2TB_ms": floor_bytes / args.floor_bw * 1e3,
        }
        row["gpu/floor"] = row["gpu_ms"] / row["floor_ms"]
        print(table([row], list(row)), flush=True)
        rows.append(row)
    return rows


def prefill_tps(args, runner: ModelRunner) -> float:
    per_seq = -(-(args.prefill_len + 1) // 16)
    gen = torch.Generator().manual_seed(1)
    chunks = [
        SeqChunk(i, torch.randint(3, min(1000, runner.vocab_size), (args.prefill_len,), generator=gen).tolist(), 0,
                 list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)), -1, True)
        for i in range(args.prefill_seqs)
    ]  # fmt: skip
    batch = ScheduledBatch(chunks)
    for _ in range(2):
        runner.execute(batch)
    times = []
    for _ in range(max(3, args.reps // 4)):
        sync(runner.device)
        t0 = time.perf_counter()
        runner.execute(batch)
        sync(runner.device)
        times.append(time.perf_counter() - t0)
    return args.prefill_seqs * args.prefill_len / statistics.median(times)


def teacher_forced(runner: ModelRunner, prompts: list[list[int]], feed: list[list[int]], slot):
    """Log-probs ``[len(prompts), steps+1, V]`` (on the device) of each position after the
    prompt, fed ``feed`` tokens (prefill then one decode step per token)."""
    per = -(-runner.max_model_len // runner.block_size)
    n = len(prompts)
    tables = [list(range(1 + i * per, 1 + (i + 1) * per)) for i in range(n)]
    rows = [[] for _ in range(n)]
    first = [SeqChunk(i, p, 0, tables[i], slot(i), True) for i, p in enumerate(prompts)]
    for i, lg in enumerate(runner.execute(ScheduledBatch(first))):
        rows[i].append(torch.log_softmax(lg.float(), -1))
    for step in range(len(feed[0])):
        chunks = [
            SeqChunk(i, [feed[i][step]], len(prompts[i]) + step, tables[i], slot(i), True)
            for i in range(n)
        ]
        for i, lg in enumerate(runner.execute(ScheduledBatch(chunks))):
            rows[i].append(torch.log_softmax(lg.float(), -1))
    return torch.stack([torch.stack(r) for r in rows])


REPO = Path(__file__).resolve().parent.parent


def prose_paragraphs() -> list[str]:
    """Paragraphs of running text from README.md and docs/*.md: no code blocks, tables,
    headings or list markup, at least 200 characters each."""
    out = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        fenced = False
        for block in path.read_text().split("\n\n"):
            lines = []
            for line in block.splitlines():
                if line.lstrip().startswith("```"):
                    fenced = not fenced
                    continue
                if fenced or line.lstrip().startswith(("|", "#", "<", "    ")):
                    continue
                lines.append(line.strip().lstrip("-*> ").strip())
            text = " ".join(x for x in lines if x)
            if len(text) >= 200:
                out.append(text)
    return out


def quality_prompts(args, runner: ModelRunner) -> list[list[int]]:
    """``--prompts`` prompts of ``--prompt-len`` tokens (see ``--prompt-text``)."""
    gen = torch.Generator().manual_seed(7)
    source = args.prompt_text
    model = args.quality_model or args.model
    if source == "auto":
        source = "random" if str(model).startswith("dummy:") else "docs"
    if source == "random":
        top = min(runner.vocab_size, 32000)
        return [torch.randint(3, top, (args.prompt_len,), generator=gen).tolist()
                for _ in range(args.prompts)]  # fmt: skip
    ids = [runner.tokenizer.encode(p, add_special_tokens=False) for p in prose_paragraphs()]
    ids = [x for x in ids if len(x) >= args.prompt_len]
    if not ids:
        raise SystemExit(f"no paragraph of {args.prompt_len} tokens in README.md and docs/")
    out = []
    for i in range(args.prompts):  # paragraph by paragraph, a window further in each round
        para = ids[i % len(ids)]
        start = (i // len(ids)) * args.prompt_len // 2
        start = min(start, len(para) - args.prompt_len)
        out.append(para[start : start + args.prompt_len])
    return out


def quality(args, ref: ModelRunner, fp8: ModelRunner, with_adapter: bool) -> dict:
    """Greedy agreement and mean KL(bf16 || fp8), in batches of ``--batch`` prompts."""
    all_prompts = quality_prompts(args, ref)
    agree, total, kls = 0, 0, []
    for b0 in range(0, args.prompts, args.batch):
        n = min(args.batch, args.prompts - b0)
        prompts = all_prompts[b0 : b0 + n]

        def slot(i: int, b0=b0) -> int:
            return (b0 + i) % ref.num_slots if with_adapter else -1

        # bf16 greedy: its own tokens, step by step
        feed: list[list[int]] = [[] for _ in range(n)]
        lp_ref = teacher_forced_greedy(ref, prompts, args.steps, slot, feed)
        lp_fp8 = teacher_forced(fp8, prompts, feed, slot)
        agree += int((lp_ref.argmax(-1) == lp_fp8.argmax(-1)).sum())
        total += lp_ref.shape[0] * lp_ref.shape[1]
        p = lp_ref.exp()
        kls.append((p * (lp_ref - lp_fp8)).sum(-1).flatten().cpu())
    kl = torch.cat(kls)
    return {"adapter": with_adapter, "positions": total, "greedy_agreement": agree / total,
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max())}  # fmt: skip


def teacher_forced_greedy(runner, prompts, steps, slot, feed):
    """Greedy decode of ``steps`` tokens (appended to ``feed``) -> log-probs as above."""
    per = -(-runner.max_model_len // runner.block_size)
    n = len(prompts)
    tables = [list(range(1 + i * per, 1 + (i + 1) * per)) for i in range(n)]
    rows = [[] for _ in range(n)]
    first = [SeqChunk(i, p, 0, tables[i], slot(i), True) for i, p in enumerate(prompts)]
    lg = runner.execute(ScheduledBatch(first))
    for step in range(steps + 1):
        for i in range(n):
            rows[i].append(torch.log_softmax(lg[i].float(), -1))
        if step == steps:
            break
        toks = lg.argmax(-1).tolist()
        for i in range(n):
            feed[i].append(toks[i])
        chunks = [
            SeqChunk(i, [feed[i][step]], len(prompts[i]) + step, tables[i], slot(i), True)
            for i in range(n)
        ]
        lg = runner.execute(ScheduledBatch(chunks))
    return torch.stack([torch.stack(r) for r in rows])


def guarded(result: dict, name: str, fn):
    """Run one section; a failure is recorded under ``errors`` and the others still run."""
    import traceback

    try:
        return fn()
    except Exception as exc:
        traceback.print_exc()
        result.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.smoke)
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("needs CUDA (--smoke runs the CPU reference path)")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise SystemExit("FP8 needs compute capability >= 8.9")
    sections = set(args.sections.split(","))
    if device.type != "cuda":
        sections.discard("gemm")
    bw = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 24))
    print(f"copy bandwidth (read+write): {bw / 1e9:.0f} GB/s", flush=True)
    result: dict = {"bench": "fp8", "args": vars(args), "info": device_info(device),
                    "copy_bandwidth_GBps": bw / 1e9}  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="lpx-fp8-"))
    config_dir = Path(args.kernel_config_dir) if args.kernel_config_dir else tmp / "kernel-configs"
    need_runners = sections & {"decode", "prefill", "quality"}
    fp8_runner = ref_runner = None
    tuned: dict = {}
    t0 = time.perf_counter()
    # the FP8 runner first: its warm-up runs the launch-config sweep (the gemm section uses it)
    fp8_runner = make_runner(args, device, "fp8", config_dir)
    result["tune"] = {
        "runner_build_s": time.perf_counter() - t0,
        "cache_file": str(fp8_runner.launch_configs.path),
        "chosen": fp8_runner.launch_configs.table.get("fp8_w8a16", {}),
        "candidates_ms": fp8_runner.tuning_report,
    }
    tuned = dict(fp8_runner.launch_configs.table.get("fp8_w8a16", {}))
    model_cfg = fp8_runner.config
    print("tuned configs:", json.dumps(tuned, indent=1), flush=True)
    if "gemm" in sections:
        if not need_runners:
            del fp8_runner
            fp8_runner = None
            gc.collect()
            torch.cuda.empty_cache()
        t = time.perf_counter()
        gemm = guarded(result, "gemm", lambda: gemm_section(args, device, bw, tuned, model_cfg))
        if gemm is not None:
            gemm["seconds"] = time.perf_counter() - t
            result["gemm"] = gemm
        write_json(args.json, result)
    if not need_runners or fp8_runner is None:
        write_json(args.json, result)
        return result
    ref_runner = make_runner(args, device, None, None)
    with torch.inference_mode():
        for r in (ref_runner, fp8_runner):
            for k_cache, v_cache in r.kv_caches:
                k_cache.normal_()
                v_cache.normal_()
            load_adapters(args, r, tmp)
    fp8r, refr = fp8_runner, ref_runner

    def decode() -> list[dict]:
        rows = decode_rows(args, refr, bw, "bf16")
        rows += decode_rows(args, fp8r, bw, "fp8")
        if fp8r.graphs is not None:  # activations unquantized at every step size
            fp8r.model.fp8.w8a8_min_tokens = 1 << 30
            fp8r.graphs.capture()
            try:
                rows += decode_rows(args, fp8r, bw, "fp8-weight-only")
            finally:
                fp8r.model.fp8.w8a8_min_tokens = args.fp8_w8a8_min_tokens
                fp8r.graphs.capture()
        for r in rows:
            ref = next(x for x in rows if x["weights"] == "bf16" and x["mode"] == r["mode"])
            r["bf16/this"] = ref["gpu_ms"] / r["gpu_ms"]
        print("\n" + table(rows, list(rows[0])), flush=True)
        return rows

    def prefill() -> dict:
        pre: dict = {"tokens": args.prefill_seqs * args.prefill_len}
        pre["bf16_tok_s"] = prefill_tps(args, refr)
        pre["fp8_tok_s"] = prefill_tps(args, fp8r)
        fp8r.model.fp8.w8a8_min_tokens = 1 << 30
        try:
            pre["fp8_weight_only_tok_s"] = prefill_tps(args, fp8r)
        finally:
            fp8r.model.fp8.w8a8_min_tokens = args.fp8_w8a8_min_tokens
        pre["fp8/bf16"] = pre["fp8_tok_s"] / pre["bf16_tok_s"]
        print(table([pre], list(pre)), flush=True)
        return pre

    def qual() -> list[dict]:
        ref_q, fp8_q = refr, fp8r
        if args.quality_model:  # a real checkpoint: its own pair of runners
            free_main_runners()
            qargs = argparse.Namespace(**{**vars(args), "model": args.quality_model})
            ref_q = make_runner(qargs, device, None, None)
            fp8_q = make_runner(qargs, device, "fp8", config_dir)
            with torch.inference_mode():
                for r in (ref_q, fp8_q):
                    load_adapters(qargs, r, tmp / "quality")
        q = []
        with torch.inference_mode():
            # FP8 activations from the threshold (default: every step), then weight-only
            for mode, threshold in (
                (f"w8a8 from {args.fp8_w8a8_min_tokens} tokens", args.fp8_w8a8_min_tokens),
                ("weight-only", 1 << 30),
            ):
                fp8_q.model.fp8.w8a8_min_tokens = threshold
                for a in (False, True):
                    q.append({"fp8": mode, **quality(args, ref_q, fp8_q, a)})
            fp8_q.model.fp8.w8a8_min_tokens = args.fp8_w8a8_min_tokens
        for row in q:
            row["model"] = args.quality_model or args.model
        print(table(q, list(q[0])), flush=True)
        return q

    def free_main_runners() -> None:
        """The 8B runners' memory back before the quality model's runners are built."""
        for r in (refr, fp8r):
            r.kv_caches.clear()
            r.graphs = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for name, fn in (("decode", decode), ("prefill", prefill), ("quality", qual)):
        if name in sections:
            t = time.perf_counter()
            out = guarded(result, name, fn)
            if out is not None:
                result[name] = out
            result.setdefault("seconds", {})[name] = time.perf_counter() - t
            write_json(args.json, result)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
