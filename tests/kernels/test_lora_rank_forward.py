"""A tiny Llama through the Triton kernels (the interpreter on a CPU machine) with a pool of
max rank 64 serving adapters of ranks 8 and 32 in one batch: the prefill steps take the
segment path, sized by the step's largest rank (``LoraPool.ranks_used`` -> ``lora_shrink``'s
``max_rank``), the decode steps the per-token path at the pool's width; against the torch
references of the same forward."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from kernel_testing import DEVICE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from model_builders import (
    AdapterSpec,
    Seq,
    build_adapter,
    build_hf_model,
    prompts_for,
    rel_err,
    runner_logits,
)

from loraplex.engine.model_runner import ModelRunner


def test_llama_ranks_8_32_in_rank_64_pool_triton_equals_reference(tmp_path, monkeypatch):
    base = build_hf_model(tmp_path / "base", "llama", seed=5)
    specs = [
        AdapterSpec(rank=8, targets=("q_proj", "v_proj", "down_proj"), seed=6),
        AdapterSpec(rank=32, targets=("q_proj", "o_proj", "gate_proj", "up_proj"), seed=7),
    ]
    adapters = [build_adapter(base, tmp_path / f"lora{i}", s) for i, s in enumerate(specs)]
    prompts = prompts_for(3, 320, seed=5)

    def run(kernels: str, fused: bool = True) -> list[torch.Tensor]:
        monkeypatch.setenv("LORAPLEX_KERNELS", kernels)
        runner = ModelRunner(
            str(base), device=DEVICE, dtype=torch.float16, block_size=4, max_num_seqs=4,
            max_model_len=32, max_loras=4, max_lora_rank=64, num_blocks=40, enforce_eager=True,
        )  # fmt: skip
        # prefill steps: the gate/up expand inside the activation (lora_silu_and_mul), or not
        runner.model.fuse_lora_act = fused
        for slot, path in enumerate(adapters):
            runner.write_slot(slot, runner.read_adapter(path))
        # the host's bound per group: the largest rank of the step's adapters there
        assert runner.lora.ranks_used({0, 1, -1}) == {"qkv": 32, "o": 32, "gate_up": 32, "down": 8}
        assert runner.lora.ranks_used({0}) == {"qkv": 8, "down": 8}
        seqs = [Seq(prompts[0], 0, [5, 6]), Seq(prompts[1], 1, [8, 9]), Seq(prompts[2], -1, [4, 3])]
        return runner_logits(runner, seqs, 2)

    ref, tri, unfused = run("ref"), run("triton"), run("triton", fused=False)
    for r, t, f in zip(ref, tri, unfused, strict=True):
        assert torch.isfinite(t).all() and torch.isfinite(f).all()
        assert rel_err(t, r) < 1e-2
        assert rel_err(f, r) < 1e-2
