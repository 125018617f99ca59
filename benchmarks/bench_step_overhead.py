"""Host time of one decode step at a large batch, on CPU: everything but the forward.

An :class:`LLMEngine` drives a stub runner whose ``execute`` builds the step's host inputs
(``build_host_inputs``, as the real runner does) and returns pre-made random logits, so only
host work is timed. 256 requests decode with the byte-level tokenizer of ``dummy:tiny``,
some with stop strings, some with logprobs, over 32 adapter keys plus the base model.

    .venv/bin/python benchmarks/bench_step_overhead.py [--seqs 256] [--steps 200]

Prints ms per decode step: schedule, build inputs, sample (its launch; the CPU computes it
there), post-process (token bookkeeping, output objects; the step's rest), and the total;
then, apart, the client side's time for the same outputs (text, stop strings, logprob
texts), which runs in the gateway processes, not in the step loop.

``--fairness``: the scheduler's price for fair scheduling instead. A closed loop keeps
2 x ``--seqs`` requests in flight over ``--seqs`` seats (each finished request is replaced:
admission and a full batch every step, as with backlogged tenants), all under one fairness
key, then split over two keys weighted 3:1; ms per step in ``Scheduler.schedule`` and in the
whole step, the runs alternated, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraplex.engine.api import AdapterRef, Request, SamplingParams
from loraplex.engine.batch import ScheduledBatch
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.lora.slots import PagePlan
from loraplex.engine.model.dummy_tokenizer import dummy_tokenizer
from loraplex.engine.model.inputs import build_host_inputs
from loraplex.engine.model.presets import PRESETS
from loraplex.engine.output_processor import OutputProcessor
from loraplex.engine.runner import StepTensors
from loraplex.heap import freeze_heap

PHASES = ("schedule", "inputs", "sample", "post")


class StubRunner:
    """The runner contract with no model: host inputs are built, logits are pre-made."""

    def __init__(self, *, num_blocks: int, block_size: int, max_model_len: int, slots: int):
        cfg = PRESETS["tiny"]
        self.tokenizer = dummy_tokenizer(cfg.vocab_size)
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = set(cfg.eos_token_ids)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_window = self.kv_local_groups = 0
        self.max_model_len, self.num_slots = max_model_len, slots
        self.lora_plan = PagePlan(slots, 0, 1, {})  # adapters take no pages here
        gen = torch.Generator().manual_seed(0)
        self._logits = [torch.randn(1024, self.vocab_size, generator=gen) * 4 for _ in range(8)]
        self._calls = 0
        self.timers = dict.fromkeys(PHASES, 0.0)

    def execute(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None):
        t = time.perf_counter()
        host = build_host_inputs(
            batch,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            num_slots=self.num_slots,
        )
        self.timers["inputs"] += time.perf_counter() - t
        self._calls += 1
        return self._logits[self._calls % 8][: host.sample_idx.shape[0]]

    def run(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None) -> StepTensors:
        return StepTensors(self.execute(batch, prev_tokens))

    def read_adapter(self, path: Path) -> str:
        return str(path)

    def adapter_pages(self, weights: object) -> dict[str, int]:
        return {}

    def write_slot(self, slot: int, weights: object, pages: dict[str, list[int]]) -> None:
        pass

    def clear_slot(self, slot: int) -> None:
        pass

    def check_alive(self) -> None:
        pass

    def close(self) -> None:
        pass


def timed(fn, timers: dict[str, float], name: str):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers[name] += time.perf_counter() - t

    return wrapper


def requests(n: int, adapters: int, max_tokens: int, greedy: bool) -> list[Request]:
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog; naïve café 日本語 🙂".split()
    refs = [AdapterRef(f"adapter-{i:03d}", ".") for i in range(adapters)]
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))
        out.append(
            Request(
                request_id=f"r{i}",
                prompt=prompt,
                sampling=SamplingParams(
                    max_tokens=max_tokens,
                    temperature=0.0 if greedy or i % 2 else 0.8,
                    top_p=1.0 if i % 3 else 0.9,
                    stop=("###", "<t9999>", "\n\nUser:") if i % 4 == 0 else (),
                    logprobs=2 if i % 16 == 0 else None,
                    ignore_eos=True,
                    seed=i if i % 5 == 0 else None,
                ),
                adapter=None if i % 8 == 0 else refs[i % adapters],
            )
        )
    return out


class GcClock:
    """Time spent in the cyclic garbage collector (``gc.callbacks``), by generation."""

    def __init__(self) -> None:
        self.ms = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self.max_ms = 0.0
        self._t = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
            return
        ms = 1e3 * (time.perf_counter() - self._t)
        self.ms[info["generation"]] += ms
        self.count[info["generation"]] += 1
        self.max_ms = max(self.max_ms, ms)


def stub_engine(seqs: int, adapters: int, in_flight: int) -> tuple[LLMEngine, dict[str, float]]:
    """An engine over the stub runner with KV blocks for ``in_flight`` sequences of the
    longest context, ``Scheduler.schedule`` timed -> (engine, the phase timers)."""
    block_size, max_model_len = 16, 2048
    runner = StubRunner(
        num_blocks=in_flight * max_model_len // block_size,
        block_size=block_size,
        max_model_len=max_model_len,
        slots=adapters,
    )
    config = EngineConfig(
        block_size=block_size,
        max_num_seqs=seqs,
        max_num_batched_tokens=4096,
        max_loras=adapters,
        max_cpu_loras=adapters,
        num_gpu_blocks=runner.num_blocks,
        device="cpu",
    )
    engine = LLMEngine(runner, config)
    timers = runner.timers
    engine.scheduler.schedule = timed(engine.scheduler.schedule, timers, "schedule")
    return engine, timers


def run(
    seqs: int, steps: int, adapters: int, warmup: int, greedy: bool, freeze: bool = False
) -> dict[str, float]:
    engine, timers = stub_engine(seqs, adapters, seqs)
    runner = engine.runner
    engine.sampler.sample = timed(engine.sampler.sample, timers, "sample")  # type: ignore[method-assign]
    processor = OutputProcessor(runner.tokenizer)  # the client side, as a gateway runs it
    trackers = {}
    for r in requests(seqs, adapters, warmup + steps + 64, greedy):
        if isinstance(r.prompt, str):  # the client tokenizes (the engine takes ids)
            r.prompt = list(runner.tokenizer.encode(r.prompt))
        engine.add_request(r)
        trackers[r.request_id] = processor.track(r, r.prompt)
    deadline = time.monotonic() + 60
    while len(engine.scheduler.running) < seqs or engine.scheduler.waiting:
        engine.step()
        if time.monotonic() > deadline:
            raise RuntimeError("requests never all ran (adapter loads?)")
    for _ in range(warmup):
        engine.step()
    if freeze:  # what the engine's step loop does once it is ready (engine/step_loop.py)
        freeze_heap()
    clock = GcClock()
    gc.callbacks.append(clock)
    for k in timers:
        timers[k] = 0.0
    n_out = 0
    client = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        if len(engine.scheduler.running) != seqs:
            raise RuntimeError("a request finished early: the batch shrank")
        outputs = engine.step()
        n_out += len(outputs)
        tc = time.perf_counter()
        for o in outputs:  # not the step loop's: timed apart, subtracted below
            trackers[o.request_id].process(o)
        client += time.perf_counter() - tc
    total = time.perf_counter() - t0 - client
    gc.callbacks.remove(clock)
    engine.shutdown()
    if freeze:
        gc.unfreeze()
    ms = {k: 1e3 * v / steps for k, v in timers.items()}
    ms["post"] = 1e3 * total / steps - sum(ms.values())
    ms["total"] = 1e3 * total / steps
    ms["outputs_per_step"] = n_out / steps
    ms["client_side"] = 1e3 * client / steps  # text, stops, logprob texts: the gateway's work
    ms["gc"] = sum(clock.ms) / steps  # (inside the phases above, client side included)
    ms["gc_full"] = clock.count[2]
    ms["gc_max"] = clock.max_ms
    return ms


def run_closed_loop(seqs: int, steps: int, adapters: int, keys: int) -> dict[str, float]:
    """``--fairness``: 2 x ``seqs`` in flight, finished ones replaced; ``keys`` 1 or 2 (3:1)."""
    engine, timers = stub_engine(seqs, adapters, 2 * seqs)
    rng = random.Random(0)
    refs = [AdapterRef(f"adapter-{i:03d}", ".") for i in range(adapters)]
    count = 0

    def add() -> None:
        nonlocal count
        i, count = count, count + 1
        key = i % 2 if keys == 2 else 0
        engine.add_request(
            Request(
                request_id=f"r{i}",
                prompt=[rng.randint(3, 200) for _ in range(rng.randint(20, 60))],
                sampling=SamplingParams(
                    max_tokens=rng.randint(16, 64), temperature=0.0, ignore_eos=True
                ),
                adapter=refs[i % adapters],
                fairness_key=f"key{key}",
                fairness_weight=3.0 if keys == 2 and key == 0 else 1.0,
            )
        )

    def step() -> None:
        for o in engine.step():
            if o.finished:
                add()

    for _ in range(2 * seqs):
        add()
    for _ in range(50):  # admission, then a steady loop
        step()
    for k in timers:
        timers[k] = 0.0
    batch = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
        batch += len(engine.scheduler.running)
    total = time.perf_counter() - t0
    engine.shutdown()
    return {
        "schedule": 1e3 * timers["schedule"] / steps,
        "total": 1e3 * total / steps,
        "batch": batch / steps,
        "preemptions": engine.scheduler.num_preemptions,
    }


def main_fairness(args: argparse.Namespace) -> None:
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for keys in runs:
            runs[keys].append(run_closed_loop(args.seqs, args.steps, args.adapters, keys))
    best = {k: min(r, key=lambda m: m["schedule"]) for k, r in runs.items()}
    print(
        f"closed loop, {2 * args.seqs} in flight over {args.seqs} seats, {args.adapters} "
        f"adapters, best of {args.repeats} x {args.steps} steps (ms/step), runs alternated"
    )
    print(f"  {'':12s}{'one key':>10s}{'two keys':>10s}")
    for k in ("schedule", "total", "batch", "preemptions"):
        print(f"  {k:12s}{best[1][k]:10.3f}{best[2][k]:10.3f}")
    print(f"  schedule, two keys - one: {best[2]['schedule'] - best[1]['schedule']:.3f} ms/step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument(
        "--greedy",
        action="store_true",
        help="every request greedy: the sample phase is then mostly host work (on CPU the "
        "default mix's sort and noise draws are compute a GPU does off the host's clock)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    ap.add_argument(
        "--gc",
        default="default,freeze",
        help="heap variants, alternated in one run: default (the collector as Python sets "
        "it), freeze (gc.freeze() once the engine is warm, as the step loop does)",
    )
    ap.add_argument(
        "--fairness",
        action="store_true",
        help="the scheduler's cost of two fairness keys (3:1) against one, closed loop",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.fairness:
        main_fairness(args)
        return
    variants = args.gc.split(",")
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            runs[v].append(
                run(args.seqs, args.steps, args.adapters, args.warmup, args.greedy, v == "freeze")
            )
    mix = "all greedy" if args.greedy else "half sampled, top-p on a third"
    print(
        f"decode step host time, {args.seqs} seqs, {args.adapters} adapters, {mix}, best of "
        f"{args.repeats} x {args.steps} steps (ms/step), variants alternated"
    )
    best = {v: min(r, key=lambda m: m["total"]) for v, r in runs.items()}
    print("  " + " " * 9 + "".join(f"{v:>10s}" for v in variants))
    for k in (*PHASES, "total", "gc", "gc_max"):
        print(f"  {k:9s}" + "".join(f"{best[v][k]:10.3f}" for v in variants))
    print(f"  {'full gcs':9s}" + "".join(f"{best[v]['gc_full']:10.0f}" for v in variants))
    if len(variants) > 1:
        base = best[variants[0]]["total"]
        for v in variants[1:]:
            print(f"  total {v} / {variants[0]}: {best[v]['total'] / base:.3f}")
    for v in variants:
        b = best[v]
        print(f"  {v}: outputs/step {b['outputs_per_step']:.1f}, client side (gateway "
              f"processes, not in the step) {b['client_side']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
