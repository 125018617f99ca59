"""Sliding-window layers and the KV pool: Gemma's local layers with tables of their own that
give the blocks behind the window back (``ModelRunner._kv_layout``), against one table for
every layer (each block holding every layer's KV, the layout before), in one run on one GPU.

One command: ``PYTHONPATH=. python benchmarks/bench_window_kv.py`` (CUDA, ``dummy:gemma3-12b``
bf16; ``--smoke``: ``dummy:tiny-gemma3`` on the CPU with a few short requests). Workload:
``--num-requests`` requests (96) of ``--prompt-len`` (4,096) random prompt ids and
``--output-len`` (128) greedy tokens each (``ignore_eos``), all queued at once, no adapters;
the KV pool sized from free memory as the engine sizes it, the same for both layouts.

Per layout: the pool in block ids and in the tokens one request may take, the most
sequences running at once and their mean over the run's steps, preemptions, the run's
seconds and output tokens a second; then windowed / one table. Where the pool bounds the
batch (long prompts, many seats), the windowed layout runs more sequences at once.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_info, pick_device, table, write_json

from loraplex.engine.api import Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model_runner import ModelRunner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:gemma3-12b")
    p.add_argument("--num-requests", type=int, default=96)
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="dummy:tiny-gemma3 on the CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.num_requests, args.prompt_len, args.output_len = (
            "dummy:tiny-gemma3",
            8,
            96,
            8,
        )
        args.max_num_seqs, args.max_num_batched_tokens = 8, 64
    return args


def run_layout(args, device: torch.device, window_groups: bool) -> dict:
    cpu = device.type == "cpu"
    runner = ModelRunner(
        args.model,
        device=device,
        dtype=torch.float32 if cpu else torch.bfloat16,
        block_size=16,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.prompt_len + args.output_len + 16,
        max_loras=1,
        max_lora_rank=16,
        gpu_memory_utilization=args.gpu_memory_utilization,
        # CPU: room for a third of the requests with one table for every layer
        num_blocks=(args.num_requests // 3) * -(-(args.prompt_len + args.output_len) // 16)
        if cpu
        else None,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        window_groups=window_groups,
    )
    cfg = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=runner.max_model_len,
        max_loras=1,
        max_lora_rank=16,
        seed=args.seed,
    )
    engine = LLMEngine(runner, cfg)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, runner.vocab_size, (args.num_requests, args.prompt_len), generator=gen)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(ids.tolist()):
        engine.add_request(Request(f"r{i}", prompt, params))
    running: list[int] = []
    out_tokens = 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            out_tokens += sum(len(c.token_ids) for c in o.choices)
        running.append(len(engine.scheduler.running))
    seconds = time.perf_counter() - t0
    row = {
        "layout": "windowed" if window_groups else "one table",
        "block_ids": runner.num_blocks,
        "request_tokens": engine.kv_tokens,
        "most_running": max(running),
        "mean_running": sum(running) / len(running),
        "preemptions": engine.stats().preemptions,
        "seconds": seconds,
        "out_tok_s": out_tokens / seconds,
    }
    assert out_tokens == args.num_requests * args.output_len, "requests ended short"
    engine.shutdown()
    del engine, runner
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.smoke)
    print(
        f"{args.model} on {device}: {args.num_requests} requests of {args.prompt_len} + "
        f"{args.output_len} tokens, {args.max_num_seqs} seats",
        flush=True,
    )
    rows = [run_layout(args, device, False), run_layout(args, device, True)]
    one, win = rows
    ratios = {
        "request_tokens": win["request_tokens"] / one["request_tokens"],
        "mean_running": win["mean_running"] / one["mean_running"],
        "out_tok_s": win["out_tok_s"] / one["out_tok_s"],
    }
    cols = list(one)
    print(table(rows, cols))
    print("windowed / one table: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    result = {"args": vars(args), "device": device_info(device), "rows": rows, "ratios": ratios}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
