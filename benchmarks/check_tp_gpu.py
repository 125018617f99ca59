"""Tensor parallelism on CUDA (NCCL, decode CUDA graphs per rank): 2 ranks against 1.

One command on a host with 2+ GPUs: ``PYTHONPATH=. python3 benchmarks/check_tp_gpu.py``.
``dummy:llama3-1b`` in float32 (so reduction-order differences stay far below the check),
two random rank-16 adapters on every projection. The same steps run on one GPU
(``ModelRunner``) and on two (``TPRunner``): a prefill of four sequences (base, adapter 1,
adapter 2, base), then greedy decode steps that replay the captured graphs. Checked: the same
greedy tokens, step logits within 1e-3 of the largest; timed: decode steps of each; then rank
1 is killed and the next step must raise ``RunnerFailed`` (no hang). Results go to
``--json``.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import device_info, write_json, write_peft_adapter
from loraplex.engine.batch import ScheduledBatch, SeqChunk
from loraplex.engine.config import EngineConfig
from loraplex.engine.errors import RunnerFailed
from loraplex.engine.model.presets import PRESETS
from loraplex.engine.runner import build_runner

MODEL = "dummy:llama3-1b"
BLOCK = 16
PROMPT = 40
SLOTS = [-1, 0, 1, -1]


def common(tp: int) -> EngineConfig:
    return EngineConfig(
        device="cuda",
        dtype="float32",
        block_size=BLOCK,
        max_num_seqs=8,
        max_model_len=256,
        max_loras=2,
        max_lora_rank=16,
        num_gpu_blocks=128,
        lora_memory_bytes=512 * 2**20,
        tensor_parallel_size=tp,
    )


def steps(runner, adapters: list[Path], n_decode: int) -> tuple[list[list[int]], list, float]:
    for slot, path in enumerate(adapters):
        runner.write_slot(slot, runner.read_adapter(path))
    per = 256 // BLOCK
    tables = [list(range(i * per, (i + 1) * per)) for i in range(len(SLOTS))]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 5000, (PROMPT,), generator=gen).tolist() for _ in SLOTS]
    chunks = [
        SeqChunk(i, p, 0, tables[i], s, True)
        for i, (p, s) in enumerate(zip(prompts, SLOTS, strict=True))
    ]
    logits = [runner.execute(ScheduledBatch(chunks)).float().cpu()]
    tokens = [[int(t)] for t in logits[0].argmax(-1)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(n_decode):
        pos = PROMPT + k
        chunks = [
            SeqChunk(i, [tokens[i][-1]], pos, tables[i], s, True) for i, s in enumerate(SLOTS)
        ]
        out = runner.execute(ScheduledBatch(chunks))
        logits.append(out.float().cpu())
        for i, t in enumerate(out.argmax(-1).tolist()):
            tokens[i].append(int(t))
    torch.cuda.synchronize()
    return tokens, logits, (time.perf_counter() - t0) / n_decode


def main() -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--decode", type=int, default=24)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 GPUs")
    cfg = PRESETS[MODEL.removeprefix("dummy:")]
    tmp = Path(tempfile.mkdtemp())
    adapters = [
        write_peft_adapter(tmp / f"a{i}", cfg, 16, seed=i, dtype=torch.float32) for i in range(2)
    ]
    r1 = build_runner(MODEL, common(1))
    if getattr(r1, "graphs", None) is None:
        raise SystemExit("TP 1: no decode graphs")
    tok1, log1, t1 = steps(r1, adapters, args.decode)
    r1.close()
    del r1
    torch.cuda.empty_cache()

    r2 = build_runner(MODEL, common(2))
    if r2.local.graphs is None:  # type: ignore[attr-defined]
        raise SystemExit("TP 2: no decode graphs")
    tok2, log2, t2 = steps(r2, adapters, args.decode)
    errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(log2, log1, strict=True)]
    worker = r2._procs[0]  # type: ignore[attr-defined]
    os.kill(worker.pid, signal.SIGKILL)
    time.sleep(2.0)
    t0 = time.perf_counter()
    try:
        steps(r2, adapters, 1)
        dead = "no error"
    except RunnerFailed as exc:
        dead = f"RunnerFailed after {time.perf_counter() - t0:.2f}s: {exc}"
    r2.close()
    result = {
        "device": device_info(torch.device("cuda", 0)),
        "model": MODEL,
        "same_tokens": tok1 == tok2,
        "max_rel_logit_err": max(errs),
        "decode_step_ms": {"tp1": t1 * 1e3, "tp2": t2 * 1e3},
        "killed_rank": dead,
    }
    print(result)
    write_json(args.json, result)
    ok = tok1 == tok2 and max(errs) < 1e-3 and dead.startswith("RunnerFailed")
    if not ok:
        raise SystemExit(f"FAILED: {result}")
    return result


if __name__ == "__main__":
    main()
