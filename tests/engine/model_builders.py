"""Tiny HF checkpoints of each served architecture and random PEFT adapters, built offline,
plus the two drivers the parity tests compare: transformers+PEFT and our ModelRunner."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.engine.batch import ScheduledBatch, SeqChunk

STEPS = 16  # greedy decode steps of each parity check
TOL = 1e-4  # relative to the largest logit
SLOTS = [2, 0, 3]  # where check_batch puts adapters 0, 1, 2 (slot 1 stays empty)
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 320
WINDOW = 5  # the sliding window of the tiny models that have one (Gemma, *-window)


def _hf_config(kind: str):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "llama-tp":  # 4 KV heads, intermediate 96, vocab 320: splits 1, 2 and 4 ways
        common.update(num_key_value_heads=4)
        return LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "llama3":  # llama 3.1 rope scaling; head_dim 32 so all three bands occur
        common.update(num_attention_heads=2, num_key_value_heads=1)
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    # sliding windows shorter than the sequences: Mistral's on every layer; Qwen2's from
    # max_window_layers on (layer 0 global, layer 1 local)
    if kind == "mistral-window":
        return MistralConfig(**common, sliding_window=WINDOW, tie_word_embeddings=False)
    if kind == "qwen2-window":
        return Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=True,
                           sliding_window=WINDOW, max_window_layers=1)  # fmt: skip
    # head_dim 32 with 4 heads: q is 128 wide on a 64 hidden (not hidden / heads)
    if kind == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    if kind == "mistral-nemo":
        return MistralConfig(**common, head_dim=32, sliding_window=None)
    if kind == "phi3":  # fused qkv_proj / gate_up_proj
        return Phi3Config(**common, pad_token_id=0, tie_word_embeddings=False)
    if kind == "phi4-mini":  # and Phi-4-mini's partial rotary (half of 16) with longrope
        common.update(max_position_embeddings=4096)
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.0, 4.0, 9.0, 16.0],
                "original_max_position_embeddings": 64}  # fmt: skip
        return Phi3Config(
            **common, pad_token_id=0, tie_word_embeddings=True, rope_parameters=rope,
            original_max_position_embeddings=64, partial_rotary_factor=0.5,
        )  # fmt: skip
    # Gemma: a window of 5 (the prompts and decodes run past it), head_dim 32, a query scale
    # other than head_dim; layer 0 local, layer 1 global
    gemma = dict(
        common, head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
    )  # fmt: skip
    if kind == "gemma2":  # soft-caps low enough to bite on these random weights
        return Gemma2Config(**gemma, attn_logit_softcapping=2.0, final_logit_softcapping=4.0)
    if kind == "gemma3":  # global layers' rope scaled (linear), local ones on their own base
        rope = {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
        return Gemma3TextConfig(**gemma, rope_parameters=rope)
    raise ValueError(kind)


def build_hf_model(path: Path, kind: str, seed: int = 0) -> Path:
    """A random 2-layer checkpoint of ``kind`` (weights, norms and biases all random)."""
    from transformers import AutoModelForCausalLM

    from loraplex.engine.model.dummy_tokenizer import dummy_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_hf_config(kind), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    dummy_tokenizer(VOCAB).save_pretrained(path)
    return path


@dataclass(frozen=True)
class AdapterSpec:
    rank: int
    targets: tuple[str, ...]
    alpha: int = 16
    rslora: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict, hash=False, compare=False)


def load_hf(base_dir: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    # eager attention: transformers' SDPA path drops Gemma 2's attention soft-capping in some
    # releases (the GPU machine's 4.x gave other greedy tokens than 5.x's eager), so the
    # reference is the plain attention in every version
    kwargs.setdefault("attn_implementation", "eager")
    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, **kwargs).eval()


def build_adapter(base, out: Path, spec: AdapterSpec) -> Path:
    """A PEFT LoRA adapter for ``base`` (a model or its directory) with random A and B.

    A model passed in is left as it was (the LoRA layers are unloaded again)."""
    from peft import LoraConfig, get_peft_model

    if isinstance(base, Path):
        base = load_hf(base)
    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        use_rslora=spec.rslora,
        **spec.extra,
    )
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():  # A: unit gain; B: a change of about 0.2 x scale of the input
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2 / p.shape[1] ** 0.5)
    peft_model.save_pretrained(out)
    peft_model.unload()
    return out


def hf_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decode (HF KV cache) -> (the ``steps`` tokens, logits ``[steps+1, V]``)."""
    ids, rows, past, feed = list(prompt), [], None, list(prompt)
    dev = next(model.parameters()).device  # the GPU tests run the reference there
    with torch.no_grad():
        for i in range(steps + 1):
            x = torch.tensor([feed], device=dev)
            out = model(input_ids=x, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1].float().cpu()
            rows.append(logits)
            if i < steps:
                ids.append(int(logits.argmax()))
                feed = ids[-1:]
    return ids[len(prompt) :], torch.stack(rows)


@dataclass
class Seq:
    prompt: list[int]
    slot: int  # -1: base
    feed: list[int]  # tokens fed on decode steps (the reference's greedy tokens)


def runner_logits(runner, seqs: list[Seq], steps: int, split: int = 3) -> list[torch.Tensor]:
    """Drive ``runner`` by hand: a two-chunk prefill for every sequence (the first ``split``
    tokens, then the rest), then ``steps`` batched decode steps fed with ``Seq.feed``.
    Returns per sequence its logits ``[steps+1, V]``."""
    per = -(-runner.max_model_len // runner.block_size)
    # interleave block ids across sequences so a block-table bug reads someone else's KV
    tables = [[b * len(seqs) + i for b in range(per)] for i in range(len(seqs))]
    poison = _poison_local_block(runner, per * len(seqs))
    groups = getattr(runner, "kv_local_groups", 0)
    stride = runner.num_blocks // (groups + 1)

    def chunk(i: int, tokens: list[int], start: int, sample: bool) -> SeqChunk:
        """Sliding-window layer groups with tables of their own: their blocks as the runner
        derives them (``build_host_inputs``), except those behind the window of the chunk's
        first query, which point at a block of NaNs, as if given back."""
        local: list[list[int]] = []
        if poison is not None:
            lo = max(0, start - runner.kv_window + 1) // runner.block_size
            local = [
                [poison] * lo + [b + (g + 1) * stride for b in tables[i][lo:]]
                for g in range(groups)
            ]
        return SeqChunk(i, tokens, start, tables[i], seqs[i].slot, sample, local_tables=local)

    runner.execute(
        ScheduledBatch([chunk(i, s.prompt[:split], 0, False) for i, s in enumerate(seqs)])
    )
    rest = [chunk(i, s.prompt[split:], split, True) for i, s in enumerate(seqs)]
    out = [[row] for row in runner.execute(ScheduledBatch(rest))]
    for step in range(steps):
        chunks = [chunk(i, [s.feed[step]], len(s.prompt) + step, True) for i, s in enumerate(seqs)]
        for i, row in enumerate(runner.execute(ScheduledBatch(chunks))):
            out[i].append(row)
    return [torch.stack(rows).cpu() for rows in out]


def _poison_local_block(runner, used: int) -> int | None:
    """A block id of the sliding-window layer groups that no table of ``used`` blocks
    reaches, filled with NaN in their layers (None: no such groups, or the caches live in
    other processes: tensor parallelism)."""
    groups = getattr(runner, "kv_local_groups", 0)
    if not groups or not hasattr(runner, "kv_caches"):
        return None
    stride = runner.num_blocks // (groups + 1)
    assert used < stride, "the runner's pool has no block to spare"
    poison = (groups + 1) * stride - 1  # the last group's block for stride - 1: unused
    for w, (k, v) in zip(runner.model.windows, runner.kv_caches, strict=True):
        if w:
            k[poison].fill_(float("nan"))
            v[poison].fill_(float("nan"))
    return poison


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def parity_references(base, adapters: list[Path], prompts: list[list[int]]):
    """(tokens, logits) per prompt: prompt 0 on the base, prompt i+1 with adapter i."""
    from peft import PeftModel

    if isinstance(base, Path):
        base = load_hf(base)
    peft = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        peft.load_adapter(str(a), adapter_name=f"a{i}")
    with peft.disable_adapter():
        refs = [hf_greedy(peft, prompts[0], STEPS)]
    for i in range(len(adapters)):
        peft.set_adapter(f"a{i}")
        refs.append(hf_greedy(peft, prompts[i + 1], STEPS))
    peft.unload()
    return refs


def hf_low_precision_logits(
    base: Path, adapters: list[Path], prompts: list[list[int]], refs, dtype, device
) -> list[torch.Tensor]:
    """HF + PEFT in ``dtype`` on ``device``, fed each reference's prompt and greedy tokens
    (one forward each) -> logits ``[steps+1, V]`` per prompt as :func:`parity_references`
    lays them out (prompt 0 on the base, prompt i+1 with adapter i). How far transformers'
    own run in that dtype lands from its float32 one: the bound a kernel in that dtype can be
    held to where routing is discontinuous (MoE)."""
    from peft import PeftModel

    model = load_hf(base).to(device=device, dtype=dtype)
    peft = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        peft.load_adapter(str(a), adapter_name=f"a{i}")
    peft = peft.to(device=device, dtype=dtype)

    def forward(prompt: list[int], tokens: list[int]) -> torch.Tensor:
        x = torch.tensor([prompt + tokens], device=device)
        with torch.no_grad():
            return peft(input_ids=x).logits[0, len(prompt) - 1 :].float().cpu()

    with peft.disable_adapter():
        out = [forward(prompts[0], refs[0][0])]
    for i in range(len(adapters)):
        peft.set_adapter(f"a{i}")
        out.append(forward(prompts[i + 1], refs[i + 1][0]))
    return out


def runner_for(model, max_loras: int = 4):
    from loraplex.engine.model_runner import ModelRunner

    return ModelRunner(
        model,
        device="cpu",
        dtype=torch.float32,
        block_size=4,
        max_num_seqs=8,
        max_model_len=64,
        max_loras=max_loras,
        max_lora_rank=64,
        num_blocks=16 * 8,
    )


def check_batch(runner, adapters, prompts, refs, *, greedy: bool = False) -> list[Seq]:
    """Base (prompt 0) and each adapter in ``SLOTS`` in one batch, every sequence within
    ``TOL`` of its reference; ``greedy``: and the same greedy tokens."""
    for slot, path in zip(SLOTS, adapters, strict=True):
        runner.write_slot(slot, runner.read_adapter(path))
    seqs = [Seq(prompts[0], -1, refs[0][0])]
    seqs += [Seq(p, s, r[0]) for p, s, r in zip(prompts[1:], SLOTS, refs[1:], strict=True)]
    got = runner_logits(runner, seqs, STEPS)
    for i, (logits, (_, ref)) in enumerate(zip(got, refs, strict=True)):
        assert logits.shape == ref.shape
        err = rel_err(logits, ref)
        assert err < TOL, f"sequence {i} (slot {seqs[i].slot}): relative error {err:.2e}"
        if greedy:
            assert logits[:-1].argmax(-1).tolist() == seqs[i].feed, f"sequence {i} tokens"
    return seqs


def prompts_for(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [7, 12, 9, 15, 10][:n]
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens]
