"""Logits of our ModelRunner vs transformers + PEFT (adapters not merged), float32 on CPU.

Every sequence of a batch is checked against its own reference: the base model and several
adapters (ranks 4..64, different target modules, rsLoRA) run together in one batch, with a
two-chunk prefill and 16 greedy decode steps. Tolerance: 1e-4 relative to the largest logit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_builders import (
    ALL_TARGETS,
    STEPS,
    TOL,
    AdapterSpec,
    Seq,
    build_adapter,
    build_hf_model,
    check_batch,
    load_hf,
    parity_references,
    prompts_for,
    rel_err,
    runner_for,
    runner_logits,
)

from loraplex.engine.batch import ScheduledBatch, SeqChunk
from loraplex.engine.model.loader import default_model_path, load_model

SPECS = [
    AdapterSpec(rank=4, targets=("q_proj", "v_proj"), alpha=8, seed=1),
    AdapterSpec(rank=16, targets=tuple(ALL_TARGETS), alpha=32, rslora=True, seed=2),
    AdapterSpec(rank=64, targets=("o_proj", "down_proj"), alpha=16, seed=3),
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("parity-llama")
    base = build_hf_model(root / "base", "llama")
    adapters = [build_adapter(base, root / f"lora{i}", s) for i, s in enumerate(SPECS)]
    return base, adapters


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "mistral"])
def test_tiny_architectures_match_hf(tmp_path, kind):
    base = build_hf_model(tmp_path / "base", kind, seed=7)
    adapters = [build_adapter(base, tmp_path / "lora", SPECS[1])]
    prompts = prompts_for(2, 320, seed=3)
    refs = parity_references(base, adapters, prompts)
    runner = runner_for(str(base))
    runner.write_slot(1, runner.read_adapter(adapters[0]))
    seqs = [Seq(prompts[0], -1, refs[0][0]), Seq(prompts[1], 1, refs[1][0])]
    for i, (logits, (_, ref)) in enumerate(
        zip(runner_logits(runner, seqs, STEPS), refs, strict=True)
    ):
        assert rel_err(logits, ref) < TOL, f"{kind} sequence {i}"


def test_tiny_llama_base_and_three_adapters_in_one_batch(tiny_llama):
    base, adapters = tiny_llama
    prompts = prompts_for(4, 320)
    refs = parity_references(base, adapters, prompts)
    runner = runner_for(str(base))
    assert runner.config.tie_word_embeddings is False
    check_batch(runner, adapters, prompts, refs)

    # the same runner after swapping slots around: clear + rewrite must not leave residue
    runner.clear_slot(0)
    runner.write_slot(0, runner.read_adapter(adapters[1]))
    seqs = [Seq(prompts[2], 0, refs[2][0])]
    (logits,) = runner_logits(runner, seqs, 2)
    assert rel_err(logits, refs[2][1][:3]) < TOL


def test_parity_check_can_fail(tiny_llama):
    """The comparison is sharp: the wrong adapter, or none, is far outside the tolerance."""
    base, adapters = tiny_llama
    prompts = prompts_for(2, 320)
    refs = parity_references(base, adapters[:1], prompts)
    runner = runner_for(str(base))
    runner.write_slot(0, runner.read_adapter(adapters[1]))  # not the adapter of refs[1]
    seqs = [Seq(prompts[1], 0, refs[1][0]), Seq(prompts[1], -1, refs[1][0])]
    wrong, none = runner_logits(runner, seqs, 2)
    assert rel_err(wrong, refs[1][1][:3]) > 100 * TOL
    assert rel_err(none, refs[1][1][:3]) > 100 * TOL


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The default GGUF (SmolLM2-135M-Instruct), dequantized, plus three adapters for it."""
    path = default_model_path()
    root = tmp_path_factory.mktemp("smollm2")
    hf = load_hf(path.parent, gguf_file=path.name)  # transformers' own GGUF reading
    adapters = [build_adapter(hf, root / f"lora{i}", s) for i, s in enumerate(SPECS)]
    return path, hf, adapters


def test_smollm2_gguf_base_and_adapters_match_hf(smollm2):
    path, hf, adapters = smollm2
    loaded = load_model(path, dtype=torch.float32, device="cpu")
    assert (loaded.config.num_layers, loaded.config.hidden_size) == (30, 576)
    assert (loaded.config.num_heads, loaded.config.num_kv_heads) == (9, 3)
    assert loaded.config.tie_word_embeddings
    assert 2 in loaded.eos_token_ids  # <|im_end|>
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False)
    assert "<|im_start|>user" in text
    prompts = [tok(t)["input_ids"] for t in ("Hello, my name is", "The capital of France")]
    prompts += [tok(t)["input_ids"] for t in ("1, 2, 3, 4,", "def fib(n):")]
    refs = parity_references(hf, adapters, prompts)
    check_batch(runner_for(loaded), adapters, prompts, refs)


def test_mixed_prefill_and_decode_batch_equals_separate_steps(tiny_llama):
    """One step holding a decode, a prefill chunk and a first prefill gives each sequence
    the logits it gets when run alone (per-sequence positions, tables, adapters)."""
    base, adapters = tiny_llama
    prompts = prompts_for(3, 320, seed=11)
    alone = runner_for(str(base))
    mixed = runner_for(str(base))
    for r in (alone, mixed):
        r.write_slot(0, r.read_adapter(adapters[0]))
        r.write_slot(1, r.read_adapter(adapters[2]))
    t = [list(range(i * 16, (i + 1) * 16)) for i in range(3)]
    p0, p1, p2 = prompts
    # sequence 0 prefilled and decoding, 1 half prefilled, 2 new
    ref = [
        alone.execute(ScheduledBatch([SeqChunk(0, p0, 0, t[0], 0, False)])),
        alone.execute(ScheduledBatch([SeqChunk(0, [9], len(p0), t[0], 0, True)])),
        alone.execute(ScheduledBatch([SeqChunk(1, p1[:5], 0, t[1], -1, False)])),
        alone.execute(ScheduledBatch([SeqChunk(1, p1[5:], 5, t[1], -1, True)])),
        alone.execute(ScheduledBatch([SeqChunk(2, p2, 0, t[2], 1, True)])),
    ]
    mixed.execute(
        ScheduledBatch(
            [SeqChunk(0, p0, 0, t[0], 0, False), SeqChunk(1, p1[:5], 0, t[1], -1, False)]
        )
    )
    got = mixed.execute(
        ScheduledBatch(
            [
                SeqChunk(1, p1[5:], 5, t[1], -1, True),
                SeqChunk(0, [9], len(p0), t[0], 0, True),
                SeqChunk(2, p2, 0, t[2], 1, True),
            ]
        )
    )
    assert got.shape == (3, 320)
    for row, want in zip(got, (ref[3][0], ref[1][0], ref[4][0]), strict=True):
        assert rel_err(row, want) < 1e-5
