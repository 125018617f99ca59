"""What an adapter costs a CPU server (``make serve`` on a laptop): one short request's engine
time with and without a LoRA adapter on the default model (SmolLM2-135M, float32), in the
engine's default adapter pool (its size decides how much rank bookkeeping the reference
LoRA ops walk each layer).

    .venv/bin/python benchmarks/bench_cpu_lora.py [--rank 32] [--prompt-len 30] [--max-tokens 1]

The adapter is random, PEFT-shaped, rank ``--rank`` on all seven projections. Requests
alternate base / adapter after a warm-up; prints the median engine time of each, their
difference (the adapter's cost) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_peft_adapter

from loraplex.engine.api import AdapterRef, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.loader import default_model_path
from loraplex.engine.model.presets import PRESETS
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.offline import OfflineEngine


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    runner = ModelRunner(
        str(default_model_path()),
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_num_seqs=8,
        max_model_len=a.prompt_len + a.max_tokens + 16,
        max_lora_rank=64,
        kv_cache_bytes=64 << 20,
    )
    engine = OfflineEngine(LLMEngine(runner, EngineConfig(max_model_len=runner.max_model_len)))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_peft_adapter(Path(tmp) / "a", PRESETS["smollm2-135m"], a.rank)
        ref = AdapterRef("bench", str(path))
        prompt = list(range(100, 100 + a.prompt_len))
        n = 0

        def once(adapter: AdapterRef | None) -> float:
            nonlocal n
            n += 1
            sampling = SamplingParams(max_tokens=a.max_tokens, temperature=0)
            engine.add_request(Request(f"r{n}", prompt, sampling, adapter=adapter))
            t0 = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            return (time.perf_counter() - t0) * 1e3

        for _ in range(2):  # warm: the adapter's load, first-call costs
            once(None), once(ref)
        times: dict[str, list[float]] = {"base": [], "adapter": []}
        for _ in range(a.reps):
            times["base"].append(once(None))
            times["adapter"].append(once(ref))
    base, lora = statistics.median(times["base"]), statistics.median(times["adapter"])
    out = {"slots": runner.lora.num_slots, "base_ms": base, "adapter_ms": lora}
    print(
        f"SmolLM2-135M on CPU ({a.threads} threads, {out['slots']} adapter slots), "
        f"{a.prompt_len}-token prompt, {a.max_tokens} token(s), rank {a.rank} on all seven "
        f"projections: base {base:.1f} ms, adapter {lora:.1f} ms (median of {a.reps}); "
        f"the adapter costs {lora - base:.1f} ms, {lora / base:.2f}x the base"
    )
    return out


if __name__ == "__main__":
    main()
