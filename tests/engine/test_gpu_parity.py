"""bf16 on the GPU (Triton kernels, CUDA graphs) vs Hugging Face + PEFT in float32.

A mid-size random Llama (4 layers, hidden 512, head_dim 64, GQA 8:2) serves the base model
and three adapters (ranks 8/16/64, different targets, rsLoRA) in one batch: a two-chunk
prefill, then 16 decode steps (graph replays) teacher-forced with the reference's greedy
tokens. Tolerance, the bf16 one of the kernel tests: max |ours - ref| / max |ref| < 3e-2
per sequence. The eager (no graph) runner must agree with the graph runner, and the wrong
adapter must land far outside the tolerance (the check is sharp).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_builders import AdapterSpec, Seq, build_adapter, hf_greedy, rel_err, runner_logits

from loraplex.engine.model_runner import ModelRunner

pytestmark = pytest.mark.gpu

TOL = 3e-2
STEPS = 16
VOCAB = 512
SPECS = [
    AdapterSpec(rank=8, targets=("q_proj", "v_proj"), alpha=16, seed=1),
    AdapterSpec(
        rank=16,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        alpha=8,  # rsLoRA: scale 8 / sqrt(16) = 2
        rslora=True,
        seed=2,
    ),
    AdapterSpec(rank=64, targets=("o_proj", "down_proj", "up_proj"), alpha=64, seed=3),
]
SLOTS = [2, 0, 3]  # slot 1 stays empty
PROMPT_LENS = [7, 40, 150, 90]  # base, then one per adapter; 150 spans 10 KV blocks


def build_mid_llama(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraplex.engine.model.dummy_tokenizer import dummy_tokenizer

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed" in name:
                p.copy_(torch.randn_like(p))
            elif "lm_head" in name:
                p.copy_(4.0 * torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model.save_pretrained(path, safe_serialization=True)
    dummy_tokenizer(VOCAB).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mid_llama(tmp_path_factory) -> tuple[Path, list[Path], list[list[int]], list]:
    """(base dir, adapter dirs, prompts, float32 HF+PEFT references (tokens, logits))."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("gpu-parity")
    base = build_mid_llama(root / "base")
    hf = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    adapters = [build_adapter(hf, root / f"lora{i}", s) for i, s in enumerate(SPECS)]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]
    peft = PeftModel.from_pretrained(hf, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        peft.load_adapter(str(a), adapter_name=f"a{i}")
    with peft.disable_adapter():
        refs = [hf_greedy(peft, prompts[0], STEPS)]
    for i in range(len(adapters)):
        peft.set_adapter(f"a{i}")
        refs.append(hf_greedy(peft, prompts[i + 1], STEPS))
    return base, adapters, prompts, refs


def make_runner(base: Path, enforce_eager: bool = False) -> ModelRunner:
    return ModelRunner(
        str(base),
        device="cuda",
        dtype=torch.bfloat16,
        block_size=16,
        max_num_seqs=8,
        max_model_len=256,
        max_loras=4,
        max_lora_rank=64,
        num_blocks=16 * 8,
        enforce_eager=enforce_eager,
    )


def batch_logits(runner: ModelRunner, adapters, prompts, refs) -> list[torch.Tensor]:
    for slot, path in zip(SLOTS, adapters, strict=True):
        runner.write_slot(slot, runner.read_adapter(path))
    seqs = [Seq(prompts[0], -1, refs[0][0])]
    seqs += [Seq(p, s, r[0]) for p, s, r in zip(prompts[1:], SLOTS, refs[1:], strict=True)]
    return runner_logits(runner, seqs, STEPS, split=5)


def test_bf16_graphs_match_hf_peft_float32(mid_llama):
    base, adapters, prompts, refs = mid_llama
    runner = make_runner(base)
    assert runner.graphs is not None and runner.dtype == torch.bfloat16
    got = batch_logits(runner, adapters, prompts, refs)
    errs = [rel_err(g, r[1]) for g, r in zip(got, refs, strict=True)]
    print("bf16 graph vs fp32 HF+PEFT, per sequence:", [f"{e:.2e}" for e in errs])
    for i, e in enumerate(errs):
        assert e < TOL, f"sequence {i} (slot {[-1, *SLOTS][i]}): relative error {e:.2e}"

    eager = batch_logits(make_runner(base, enforce_eager=True), adapters, prompts, refs)
    for i, (g, e) in enumerate(zip(got, eager, strict=True)):
        assert torch.isfinite(g).all()
        assert rel_err(g, e) < 1e-2, f"sequence {i}: graph replay differs from eager"


def test_bf16_parity_check_is_sharp(mid_llama):
    """The wrong adapter (or none) is far outside the bf16 tolerance."""
    base, adapters, prompts, refs = mid_llama
    runner = make_runner(base)
    runner.write_slot(0, runner.read_adapter(adapters[2]))  # not the adapter of refs[2]
    seqs = [Seq(prompts[2], 0, refs[2][0]), Seq(prompts[2], -1, refs[2][0])]
    wrong, none = runner_logits(runner, seqs, 4, split=5)
    assert rel_err(wrong, refs[2][1][:5]) > 3 * TOL
    assert rel_err(none, refs[2][1][:5]) > 3 * TOL
