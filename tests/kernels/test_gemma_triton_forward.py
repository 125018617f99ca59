"""A tiny Gemma 3 through the Triton kernels (the interpreter on a CPU machine): every op of
its forward (the float32 (1 + w) norms beside float16 activations, q/k norms, GeGLU, rope
with the local layers' own base, windowed attention, the LoRA kernels) in one model, against
the torch references of the same forward. (Soft-capping: tests/kernels/test_attention.py.)"""

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

STEPS = 2


def test_gemma3_forward_triton_equals_reference(tmp_path, monkeypatch):
    base = build_hf_model(tmp_path / "base", "gemma3", seed=3)
    spec = AdapterSpec(rank=8, targets=("q_proj", "o_proj", "up_proj", "down_proj"), seed=4)
    adapter = build_adapter(base, tmp_path / "lora", spec)
    prompts = prompts_for(2, 320, seed=4)  # 7 and 12 tokens, past the window of 5
    dtype = torch.float16

    def run(kernels: str) -> list[torch.Tensor]:
        monkeypatch.setenv("LORAPLEX_KERNELS", kernels)
        runner = ModelRunner(
            str(base), device=DEVICE, dtype=dtype, block_size=4, max_num_seqs=4,
            max_model_len=32, max_loras=2, max_lora_rank=8, num_blocks=32, enforce_eager=True,
        )  # fmt: skip
        runner.write_slot(0, runner.read_adapter(adapter))
        seqs = [Seq(prompts[0], -1, [5, 6]), Seq(prompts[1], 0, [8, 9])]
        return runner_logits(runner, seqs, STEPS)

    ref, tri = run("ref"), run("triton")
    for r, t in zip(ref, tri, strict=True):
        assert torch.isfinite(t).all()
        assert rel_err(t, r) < 1e-2
