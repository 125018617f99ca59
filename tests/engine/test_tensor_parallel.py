"""Tensor parallelism on CPU with gloo: 2 and 4 ranks as real processes against 1 rank.

A tiny random Llama (fp32, 4 KV heads) with two adapters runs the same mixed batch of base and
adapter requests through the whole engine at each size, with too few KV blocks and adapter
slots for them all (preemption, chunked prefill, slot evictions fanned out to the ranks) and
a prefix hit. The schedule depends on the block and slot counts only, so every size runs the
same steps: each step's logits must agree within fp32 tolerance and the greedy tokens exactly.
A rank killed mid-run ends the engine with its requests failed (no hang); a size that does
not divide the model is refused in one line before any process starts.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_drive import drive_mixed, mixed_requests
from model_builders import (
    VOCAB,
    AdapterSpec,
    build_adapter,
    build_hf_model,
    check_batch,
    parity_references,
    prompts_for,
)
from test_family_parity import FUSED_SPECS, SPLIT_SPECS

from loraplex.engine.api import EngineOutput, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.errors import RunnerFailed
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.config import UnsupportedModel
from loraplex.engine.runner import StepTensors, build_runner
from loraplex.engine.step_loop import StepLoop

MAX_TOKENS = 6
GREEDY = dict(temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS)
TOL = 1e-4  # relative to the largest logit
SPECS = [
    AdapterSpec(rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"), alpha=16, seed=1),
    AdapterSpec(rank=16, targets=("v_proj", "o_proj", "up_proj", "down_proj"), seed=2),
]  # fmt: skip
# a few requests' worth of blocks for 9 requests, 1 adapter slot for 2 adapters
SMALL = dict(block_size=4, num_gpu_blocks=12, max_loras=1, max_lora_rank=16,
             max_num_batched_tokens=12, device="cpu", dtype="float32")  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("tp")
    base = build_hf_model(root / "base", "llama-tp", seed=3)
    return base, [build_adapter(base, root / f"lora{i}", s) for i, s in enumerate(SPECS)]


class Recording:
    """The runner, keeping each step's logits."""

    def __init__(self, runner: Any) -> None:
        self.inner = runner
        self.logits: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, batch: Any, prev_tokens: torch.Tensor | None = None) -> StepTensors:
        out = self.inner.run(batch, prev_tokens)
        self.logits.append(out.logits.clone())
        return out


def _serve(model: tuple[Path, list[Path]], tp: int) -> tuple[dict, dict, list[torch.Tensor], int]:
    base, adapters = model
    # one loader thread: adapter loads finish in request order, so the schedule is the same
    config = EngineConfig(**SMALL, tensor_parallel_size=tp, adapter_load_workers=1)
    runner = Recording(build_runner(str(base), config))
    engine = LLMEngine(runner, config)  # type: ignore[arg-type]
    try:
        reqs, _ = mixed_requests("tp", adapters, [None, 0, 1], GREEDY, prefix_of=4)
        got, cached = drive_mixed(engine, reqs)
        assert engine.blocks.is_whole() and engine.slots.is_idle()
        return got, cached, runner.logits, engine.stats().preemptions
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def single(model):
    return _serve(model, 1)


@pytest.mark.parametrize("tp", [2, 4])
def test_ranks_match_one_rank(model, single, tp):
    got1, cached1, logits1, preempt1 = single
    assert preempt1 > 0 and cached1["p"] >= 8  # the run covers preemption and a prefix hit
    got, cached, logits, preempt = _serve(model, tp)
    assert got == got1
    assert cached == cached1 and preempt == preempt1
    assert len(logits) == len(logits1)
    for step, (a, b) in enumerate(zip(logits, logits1, strict=True)):
        assert a.shape == b.shape, step
        if not b.numel():
            continue  # a step of prefill chunks that sample nothing
        err = (a - b).abs().max().item() / b.abs().max().item()
        assert err < TOL, f"step {step}: relative error {err:.2e}"


@pytest.mark.parametrize(
    ("kind", "specs"),
    [("qwen2", SPLIT_SPECS), ("phi3", FUSED_SPECS), ("gemma2", SPLIT_SPECS)],
    ids=["qwen2", "phi3", "gemma2"],
)
def test_two_ranks_match_hf_across_families(tmp_path, kind, specs):
    """Qwen2 (qkv bias, tied embedding and head), Phi-3 (fused qkv_proj / gate_up_proj in
    the checkpoint and in the adapters) and Gemma 2 (normed block outputs, scaled embedding,
    soft-capped logits, sliding windows) split 2 ways: the base and three adapters in one
    batch against transformers + PEFT."""
    base = build_hf_model(tmp_path / "base", kind, seed=5)
    adapters = [build_adapter(base, tmp_path / f"lora{i}", s) for i, s in enumerate(specs)]
    prompts = prompts_for(4, VOCAB, seed=1)
    refs = parity_references(base, adapters, prompts)
    config = EngineConfig(device="cpu", dtype="float32", block_size=4, max_num_seqs=8,
                          max_model_len=64, max_loras=4, max_lora_rank=64, num_gpu_blocks=128,
                          tensor_parallel_size=2)  # fmt: skip
    runner = build_runner(str(base), config)
    try:
        check_batch(runner, adapters, prompts, refs, greedy=True)
    finally:
        runner.close()


def test_killed_rank_ends_the_engine(model):
    base, _ = model
    config = EngineConfig(**{**SMALL, "num_gpu_blocks": 64}, tensor_parallel_size=2)
    outputs: list[EngineOutput] = []
    dead = threading.Event()
    ready = threading.Event()
    loop = StepLoop(
        lambda: LLMEngine.from_model(str(base), config),
        outputs.extend,
        on_ready=lambda _engine: ready.set(),
        on_dead=lambda _exc: dead.set(),
    )
    loop.start()
    assert ready.wait(120) and loop.is_ready, loop.failure
    runner = loop.engine.runner  # type: ignore[union-attr]
    worker = runner._procs[0]
    long = dict(GREEDY, max_tokens=200)
    for i in range(3):
        loop.add(Request(f"k{i}", [5 + i] * 6, SamplingParams(**long)))
    deadline = time.monotonic() + 60
    while not any(o.choices and o.choices[0].token_ids for o in list(outputs)):
        assert time.monotonic() < deadline, f"no tokens: {outputs}"
        time.sleep(0.01)
    os.kill(worker.pid, signal.SIGKILL)
    assert dead.wait(30), "the engine did not end"
    assert isinstance(loop.failure, RunnerFailed)
    assert "rank 1" in str(loop.failure)
    ended = {o.request_id: o for o in outputs if o.finished}
    assert set(ended) == {"k0", "k1", "k2"}
    assert all(o.error is not None and o.error.kind in ("RunnerFailed", "EngineDead")
               for o in ended.values())  # fmt: skip
    loop.shutdown()


def test_size_that_does_not_divide_is_refused(model):
    base, _ = model
    # 4 heads and 4 KV heads, intermediate 96, vocab 320: 3 divides none of the heads
    with pytest.raises(
        UnsupportedModel, match="tensor_parallel_size 3 does not divide the model's attention heads"
    ):
        build_runner(str(base), EngineConfig(device="cpu", tensor_parallel_size=3))
    with pytest.raises(UnsupportedModel, match="KV heads"):
        build_runner("dummy:tiny", EngineConfig(device="cpu", tensor_parallel_size=4))
    with pytest.raises(UnsupportedModel, match="MoE experts"):
        build_runner("dummy:tiny-moe", EngineConfig(device="cpu", tensor_parallel_size=2))
