"""Qwen3-MoE in bf16 on the GPU (Triton grouped GEMMs, expert LoRA, CUDA graphs) vs HF +
PEFT in float32, at Qwen3-30B-A3B's layer shapes (hidden 2048, 128 experts, top-8, expert
width 768, GQA 32:4, head_dim 128) with 2 layers: the base and three adapters (attention and
experts, experts only, all) in one batch, two-chunk prefill then 16 graph-replayed decode
steps, and the same eager.

Judged per position, not by the worst one: top-k routing is discontinuous, and bf16's
rounding of the hidden state moves a token's router logits enough to reorder near-tied
experts now and then: a spike at that position. Transformers' own bf16 forward does the same
(CPU, 2026-12-03, 2 layers 2048 wide, 128 experts 64 wide, with the router at sd 1 as this
test had it: HF bf16 vs HF fp32 0.13-0.45 per sequence, ours 0.16-0.56; the first H200 run's
0.15 on the base sequence was this. With the router at sd 2 / sqrt(2048) as now: HF
0.03-0.07, ours 0.06-0.09, our medians 1.6-1.9e-2). So per sequence: the median position
within 3e-2 of the largest logit (the dense families' bound; a wrong kernel or adapter moves
every position) or, where transformers' own bf16 run (HF + PEFT in bf16 on the same GPU, fed
the same tokens) lands further from float32, within 1.25x of its median; and no position past
0.25. The adapters' sequences need that: the first H200 run of these shapes gave medians
3.05-3.48e-2 with adapters, and transformers' bf16 on the CPU 3.2-6.1e-2 on the same
sequences (1.6e-2 on the base one; ours 1.3e-2). Graph replay equals eager (same kernels)
within 3e-2, and the prefills' expert LoRA on the segment kernels over grouped pairs (forced:
these prompts route fewer pairs than ``moe.GROUPED_MIN_PAIRS``) equals the per-token one by
the same per-position bounds (another summation order: a near tie may flip)."""

from __future__ import annotations

import pytest
import torch
from model_builders import (
    Seq,
    hf_low_precision_logits,
    parity_references,
    rel_err,
    runner_logits,
)
from test_moe_parity import (
    EXPERT,
    MEDIAN_TOL,
    SPIKE_TOL,
    build_moe_model,
    position_errors,
    write_adapter,
)

from loraplex.engine.model import llama, moe
from loraplex.engine.model_runner import ModelRunner

pytestmark = pytest.mark.gpu

REAL = dict(
    vocab_size=4096, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=512,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)  # fmt: skip
SPECS = [(8, ("q_proj", "v_proj", *EXPERT), 1), (16, EXPERT, 2),
         (32, ("q_proj", "k_proj", "v_proj", "o_proj", *EXPERT), 3)]  # fmt: skip


def test_moe_bf16_gpu_matches_hf(tmp_path, monkeypatch):
    base = build_moe_model(tmp_path / "base", shape=REAL)
    adapters = [
        write_adapter(tmp_path / f"a{i}", r, t, s, shape=REAL) for i, (r, t, s) in enumerate(SPECS)
    ]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 4096, (n,), generator=g).tolist() for n in (7, 40, 150, 90)]
    refs = parity_references(base, adapters, prompts)
    hf_bf16 = hf_low_precision_logits(base, adapters, prompts, refs, torch.bfloat16, "cuda")
    median_tol = []
    for i, (logits, (_, ref)) in enumerate(zip(hf_bf16, refs, strict=True)):
        med, top = position_errors(logits, ref)
        print(f"HF bf16 seq {i}: rel err median {med:.2e} max {top:.2e}")
        median_tol.append(max(MEDIAN_TOL, 1.25 * med))
    torch.cuda.empty_cache()
    errors: dict[tuple[str, int], tuple[float, float]] = {}
    got_by_mode = {}
    # graphs; eager; graphs with GROUPED_MIN_PAIRS off, so that the prefills' expert LoRA
    # takes the segment kernels over the pairs grouped on the device (these prompts route
    # fewer pairs than that bound, and 2 per (adapter, expert) and more)
    min_pairs, chose = moe.GROUPED_MIN_PAIRS, []

    def recorded(*args, **kw):  # the path each MoE layer takes, so the mode shows it ran
        chose.append(moe.expert_grouped(*args, **kw))
        return chose[-1]

    monkeypatch.setattr(llama, "expert_grouped", recorded)
    for mode in ("graphs", "eager", "graphs grouped"):
        monkeypatch.setattr(moe, "GROUPED_MIN_PAIRS", 0 if mode == "graphs grouped" else min_pairs)
        chose.clear()
        runner = ModelRunner(
            str(base), device="cuda", dtype=torch.bfloat16, block_size=16, max_num_seqs=8,
            max_model_len=256, max_loras=4, max_lora_rank=64, num_blocks=16 * 8,
            enforce_eager=mode == "eager",
        )  # fmt: skip
        for slot, path in zip([2, 0, 3], adapters, strict=True):
            runner.write_slot(slot, runner.read_adapter(path))
        seqs = [Seq(prompts[0], -1, refs[0][0])]
        seqs += [Seq(p, s, r[0]) for p, s, r in zip(prompts[1:], [2, 0, 3], refs[1:], strict=True)]
        got = got_by_mode[mode] = runner_logits(runner, seqs, 16)
        for i, (logits, (_, ref)) in enumerate(zip(got, refs, strict=True)):
            med, top = position_errors(logits, ref)
            print(f"{mode} seq {i}: rel err median {med:.2e} max {top:.2e}")
            errors[(mode, i)] = med, top
        assert any(chose) == (mode == "graphs grouped"), f"{mode}: grouped path {chose}"
    bad = {
        k: f"{m:.2e}/{t:.2e}"
        for k, (m, t) in errors.items()
        if not (m < median_tol[k[1]] and t < SPIKE_TOL)
    }
    assert not bad, f"(mode, sequence): relative error median/max {bad}; median bounds {median_tol}"
    for i, (g, e, gg) in enumerate(zip(*got_by_mode.values(), strict=True)):
        assert rel_err(g, e) < 3e-2, f"sequence {i}: graph replay differs from eager"
        # per position, as against the reference: the grouped kernels sum in another order,
        # and bf16 rounding then flips a near-tied expert now and then (H100, 12-06: one
        # position of sequence 1 0.10 apart, both as near float32 as the other modes)
        med, top = position_errors(gg, g)
        assert med < MEDIAN_TOL and top < SPIKE_TOL, (
            f"sequence {i}: grouped expert LoRA differs from per-token: median {med:.2e}, "
            f"max {top:.2e}"
        )
