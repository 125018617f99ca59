"""Families beyond Llama (Qwen3, Mistral-Nemo, Phi-3/4, Gemma 2/3) against transformers +
PEFT, fp32 CPU.

Each family is a tiny random checkpoint built with transformers' own config class and PEFT
adapters on it (for Phi-3 on its fused ``qkv_proj`` / ``gate_up_proj``). Checked: logits
within 1e-4 and the same greedy tokens, for an adapter alone and for the base and three
adapters in one batch (two-chunk prefill, then batched decode). Gemma's tiny models have a
window of 5, so every sequence runs past it in its local layers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from model_builders import (
    ALL_TARGETS,
    STEPS,
    TOL,
    AdapterSpec,
    Seq,
    build_adapter,
    build_hf_model,
    check_batch,
    hf_greedy,
    load_hf,
    parity_references,
    prompts_for,
    rel_err,
    runner_for,
    runner_logits,
)

FUSED_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
SPLIT_SPECS = [
    AdapterSpec(rank=4, targets=("q_proj", "k_proj"), alpha=8, seed=1),
    AdapterSpec(rank=16, targets=tuple(ALL_TARGETS), alpha=32, rslora=True, seed=2),
    AdapterSpec(rank=32, targets=("v_proj", "o_proj", "up_proj", "down_proj"), seed=3),
]
FUSED_SPECS = [
    AdapterSpec(rank=4, targets=("qkv_proj",), alpha=8, seed=1),
    AdapterSpec(rank=16, targets=FUSED_TARGETS, alpha=32, rslora=True, seed=2),
    AdapterSpec(rank=32, targets=("gate_up_proj", "down_proj"), seed=3),
]
FAMILIES = {
    "qwen3": SPLIT_SPECS,
    "mistral-nemo": SPLIT_SPECS,
    "phi3": FUSED_SPECS,
    "phi4-mini": FUSED_SPECS,  # and partial rotary with longrope
    # local and global layers, a window shorter than the sequences; Gemma 2's soft-caps,
    # Gemma 3's q/k norms and two rope bases
    "gemma2": SPLIT_SPECS,
    "gemma3": SPLIT_SPECS,
    # a window on every layer (Mistral v0.1's config), and Qwen2's on the layers from
    # max_window_layers on: served at the full context
    "mistral-window": SPLIT_SPECS,
    "qwen2-window": SPLIT_SPECS,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path, list[Path]]:
    kind = request.param
    root = tmp_path_factory.mktemp(f"parity-{kind}")
    base = build_hf_model(root / "base", kind, seed=5)
    adapters = [build_adapter(base, root / f"lora{i}", s) for i, s in enumerate(FAMILIES[kind])]
    return kind, base, adapters


def test_family_base_and_three_adapters_in_one_batch(family):
    kind, base, adapters = family
    prompts = prompts_for(4, 320, seed=1)
    refs = parity_references(base, adapters, prompts)
    runner = runner_for(str(base))
    assert runner.config.architecture.lower().startswith(kind[:3])
    check_batch(runner, adapters, prompts, refs, greedy=True)


def test_family_each_adapter_alone(family):
    kind, base, adapters = family
    prompts = prompts_for(4, 320, seed=2)
    refs = parity_references(base, adapters, prompts)
    runner = runner_for(str(base))
    for i, path in enumerate(adapters):
        runner.write_slot(1, runner.read_adapter(path))
        tokens, ref = refs[i + 1]
        (logits,) = runner_logits(runner, [Seq(prompts[i + 1], 1, tokens)], STEPS)
        assert rel_err(logits, ref) < TOL, f"{kind} adapter {i}"
        assert logits[:-1].argmax(-1).tolist() == tokens, f"{kind} adapter {i} tokens"
        runner.clear_slot(1)


def test_family_parity_can_fail(family):
    """The wrong adapter, or none, is far outside the tolerance (the check is sharp)."""
    kind, base, adapters = family
    prompts = prompts_for(2, 320, seed=3)
    refs = parity_references(base, adapters[1:2], prompts)
    runner = runner_for(str(base))
    runner.write_slot(0, runner.read_adapter(adapters[2]))
    tokens, ref = refs[1]
    wrong, none = runner_logits(
        runner, [Seq(prompts[1], 0, tokens), Seq(prompts[1], -1, tokens)], 2
    )
    assert rel_err(wrong, ref[:3]) > 100 * TOL, kind
    assert rel_err(none, ref[:3]) > 100 * TOL, kind


def test_family_adapter_for_another_layout_refused(family, tmp_path):
    """The engine's own read refuses the other layout's names and a wrong-width B."""
    from safetensors.torch import load_file, save_file

    from loraplex.engine.errors import AdapterIncompatible

    kind, base, adapters = family
    runner = runner_for(str(base))
    src = adapters[1]  # every module
    swap = {"qkv_proj": "q_proj", "gate_up_proj": "up_proj"} if "phi" in kind else {}
    swap = swap or {"q_proj": "qkv_proj", "gate_proj": "gate_up_proj"}
    tensors = load_file(str(src / "adapter_model.safetensors"))
    for i, (old, new) in enumerate(swap.items()):
        out = tmp_path / f"swap{i}"
        out.mkdir()
        (out / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        save_file(
            {k.replace(f".{old}.", f".{new}."): v for k, v in tensors.items()},
            str(out / "adapter_model.safetensors"),
        )
        with pytest.raises(AdapterIncompatible, match=f"{new} does not exist"):
            runner.read_adapter(out)
    out = tmp_path / "narrow"
    out.mkdir()
    (out / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    narrow = {k: v[:-2] if "o_proj.lora_B" in k else v for k, v in tensors.items()}
    save_file(narrow, str(out / "adapter_model.safetensors"))
    with pytest.raises(AdapterIncompatible, match="o_proj: shape mismatch"):
        runner.read_adapter(out)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "mistral-window", "qwen2-window"])
def test_window_and_caps_matter(kind, tmp_path):
    """The same weights served without the window (or without Gemma 2's soft-caps) are far
    from the reference: the parity above checks the window and the caps, not just shapes."""
    import dataclasses

    from loraplex.engine.model.loader import load_model

    base = build_hf_model(tmp_path / "base", kind, seed=5)
    prompt = prompts_for(2, 320, seed=1)[1]  # 12 tokens and 16 steps past a window of 5
    tokens, ref = hf_greedy(load_hf(base), prompt, STEPS)
    loaded = load_model(str(base))
    cfg = loaded.config
    variants = {"no window": dataclasses.replace(cfg, sliding_window=1 << 20)}
    if kind == "gemma2":
        variants["no caps"] = dataclasses.replace(
            cfg, attn_logit_softcap=None, final_logit_softcap=None
        )
    for what, changed in variants.items():
        loaded.config = changed
        (logits,) = runner_logits(runner_for(loaded), [Seq(prompt, -1, tokens)], STEPS)
        assert rel_err(logits, ref) > 100 * TOL, f"{kind}: {what}"
    loaded.config = cfg
    (logits,) = runner_logits(runner_for(loaded), [Seq(prompt, -1, tokens)], STEPS)
    assert rel_err(logits, ref) < TOL
