"""Qwen3, Mistral-Nemo and Phi-4-mini in bf16 on the GPU (Triton kernels, CUDA graphs) vs
transformers + PEFT in float32, at the real layer shapes of qwen3-8b (q/k RMSNorm),
mistral-nemo-12b (head_dim 128 on a 5120 hidden: q narrower than hidden) and phi4-mini
(fused qkv_proj / gate_up_proj, rotary on 96 of 128 dims with longrope's short factors),
with 4 layers and a 4,096-token vocabulary. Built with transformers' own config classes.

The base and three PEFT adapters (Phi's on the fused modules) in one batch: a two-chunk
prefill, then 16 decode steps (graph replays) fed with the reference's greedy tokens;
max |ours - ref| / max |ref| < 3e-2 per sequence (the bf16 tolerance of test_gpu_gemma).
The eager runner agrees with the graph runner, and the adapters served in the wrong slots
(or none) land far outside the tolerance. The checkpoint is not written to disk: the runner
is built from the HF model's tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_builders import AdapterSpec, Seq, build_adapter, hf_greedy, rel_err, runner_logits

from loraplex.engine.model.config import config_from_hf
from loraplex.engine.model.loader import LoadedModel, build_weights
from loraplex.engine.model_runner import ModelRunner

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPE = torch.bfloat16
TOL = 3e-2
STEPS = 16
SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
SPECS = dict(
    split=[
        AdapterSpec(rank=8, targets=("q_proj", "v_proj"), alpha=16, seed=1),
        AdapterSpec(rank=16, targets=SPLIT, alpha=8, rslora=True, seed=2),
        AdapterSpec(rank=64, targets=("o_proj", "down_proj", "up_proj"), alpha=64, seed=3),
    ],
    fused=[
        AdapterSpec(rank=8, targets=("qkv_proj",), alpha=16, seed=1),
        AdapterSpec(rank=16, targets=FUSED, alpha=8, rslora=True, seed=2),
        AdapterSpec(rank=64, targets=("o_proj", "gate_up_proj", "down_proj"), alpha=64, seed=3),
    ],
)
SLOTS = [2, 0, 3]
COMMON = dict(vocab_size=4096, num_hidden_layers=4, bos_token_id=1, eos_token_id=2)
SHAPES = {  # the presets' layer shapes (engine/model/presets.py)
    "qwen3": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                  max_position_embeddings=40960, tie_word_embeddings=False),
    "mistral-nemo": dict(hidden_size=5120, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                         rope_theta=1e6, max_position_embeddings=1024000, sliding_window=None,
                         tie_word_embeddings=False),
    "phi4-mini": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                      num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
                      original_max_position_embeddings=4096, partial_rotary_factor=0.75,
                      tie_word_embeddings=True, pad_token_id=0),
}  # fmt: skip
# base, then one per adapter; 600 tokens span 38 KV blocks
PROMPTS = [7, 100, 600, 300]


def hf_config(kind: str):
    from transformers import MistralConfig, Phi3Config, Qwen3Config

    shape = {**COMMON, **SHAPES[kind]}
    if kind == "qwen3":
        return Qwen3Config(**shape)
    if kind == "mistral-nemo":
        return MistralConfig(**shape)
    # Phi-4-mini: longrope below its original context (the short factors, and the attention
    # factor of max / original = 32); factors other than 1 so a wrong rotary shows
    half = int(shape["hidden_size"] // shape["num_attention_heads"] * 0.75) // 2
    short = [1.0 + 2.0 * i / half for i in range(half)]
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": short, "long_factor": [4.0 * f for f in short],
            "original_max_position_embeddings": shape["original_max_position_embeddings"]}  # fmt: skip
    return Phi3Config(**shape, rope_parameters=rope)


def hf_model(kind: str):
    from transformers import AutoModelForCausalLM

    cfg = hf_config(kind)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    h = cfg.hidden_size
    with torch.no_grad():  # unit-gain layers, norms near 1, logits of a few units
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed" in name or "lm_head" in name:
                p.copy_(4.0 * torch.randn_like(p) / h**0.5)
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def loaded(model) -> LoadedModel:
    from loraplex.engine.model.dummy_tokenizer import dummy_tokenizer

    d = json.loads(model.config.to_json_string())
    d["architectures"] = [type(model).__name__]
    cfg = config_from_hf(d)
    state = model.state_dict()
    weights = build_weights(cfg, state.__getitem__, DTYPE, torch.device(DEVICE))
    return LoadedModel(cfg, weights, dummy_tokenizer(cfg.vocab_size), frozenset({2}), "hf")


def references(model, adapters: list[Path], prompts: list[list[int]]):
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        peft.load_adapter(str(a), adapter_name=f"a{i}")
    with peft.disable_adapter():
        refs = [hf_greedy(peft, prompts[0], STEPS)]
    for i in range(len(adapters)):
        peft.set_adapter(f"a{i}")
        refs.append(hf_greedy(peft, prompts[i + 1], STEPS))
    return peft.unload(), [(t, r.cpu()) for t, r in refs]


def make_runner(model: LoadedModel, eager: bool = False) -> ModelRunner:
    max_len = max(PROMPTS) + STEPS + 16
    return ModelRunner(
        model, device=DEVICE, dtype=DTYPE, block_size=16, max_num_seqs=8, max_model_len=max_len,
        max_loras=4, max_lora_rank=64, num_blocks=4 * -(-max_len // 16), enforce_eager=eager,
    )  # fmt: skip


def batch(runner, adapters, slots, prompts, refs, steps: int = STEPS) -> list[torch.Tensor]:
    """Adapter i in ``slots[i]``; the sequences of ``SLOTS`` order fed the refs' tokens."""
    for slot, path in zip(slots, adapters, strict=True):
        runner.write_slot(slot, runner.read_adapter(path))
    seqs = [Seq(prompts[0], -1, refs[0][0])]
    seqs += [Seq(p, s, r[0]) for p, s, r in zip(prompts[1:], SLOTS, refs[1:], strict=True)]
    return runner_logits(runner, seqs, steps, split=5)


@pytest.mark.parametrize("kind", ["qwen3", "mistral-nemo", "phi4-mini"])
def test_family_bf16_real_shapes_match_hf_peft_float32(kind, tmp_path):
    model = hf_model(kind)
    specs = SPECS["fused" if kind.startswith("phi") else "split"]
    adapters = [build_adapter(model, tmp_path / f"lora{i}", s) for i, s in enumerate(specs)]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, COMMON["vocab_size"], (n,), generator=g).tolist() for n in PROMPTS]
    model, refs = references(model, adapters, prompts)
    ours = loaded(model)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    cfg = ours.config
    assert cfg.architecture.lower().startswith(kind[:3]) and cfg.num_layers == 4
    if kind == "qwen3":
        assert cfg.qk_norm
    if kind == "mistral-nemo":
        assert cfg.q_size == 4096 < cfg.hidden_size
    if kind == "phi4-mini":
        assert cfg.fused_proj and cfg.rotary_dim == 96 and cfg.rope_scaling.kind == "longrope"

    runner = make_runner(ours)
    assert runner.graphs is not None
    got = batch(runner, adapters, SLOTS, prompts, refs)
    errs = [rel_err(x, r[1]) for x, r in zip(got, refs, strict=True)]
    print(f"{kind} bf16 graph vs fp32 HF+PEFT, per sequence:", [f"{e:.2e}" for e in errs])
    for i, e in enumerate(errs):
        assert e < TOL, f"{kind} sequence {i} (slot {[-1, *SLOTS][i]}): relative error {e:.2e}"
    del runner

    eager = make_runner(ours, eager=True)
    same = batch(eager, adapters, SLOTS, prompts, refs)
    for i, (x, e) in enumerate(zip(got, same, strict=True)):
        assert torch.isfinite(x).all()
        assert rel_err(x, e) < 1e-2, f"{kind} sequence {i}: graph replay differs from eager"

    # the check is sharp: each sequence served with another one's adapter (slots rotated),
    # and adapter 1's prompt on the base, land far outside the tolerance
    rotated = SLOTS[1:] + SLOTS[:1]
    wrong = batch(eager, adapters, rotated, prompts, refs, steps=4)
    off = [rel_err(x, r[1][:5]) for x, r in zip(wrong[1:], refs[1:], strict=True)]
    (none,) = runner_logits(eager, [Seq(prompts[2], -1, refs[2][0])], 4, split=5)
    off.append(rel_err(none, refs[2][1][:5]))
    print(f"{kind} wrong adapters, then none:", [f"{e:.2e}" for e in off])
    for i, e in enumerate(off):
        assert e > 3 * TOL, f"{kind} case {i} of the sharpness check is within {e:.2e}"
