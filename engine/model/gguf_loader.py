"""GGUF checkpoints (llama architecture): config from the metadata, weights dequantized.

llama.cpp's converter permutes the rows of Q and K (interleaved rotary pairs); they are
un-permuted here back to the Hugging Face (rotate-halves) layout, as transformers does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraplex.engine.model.config import ModelConfig, UnsupportedModel

_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModel(f"GGUF architecture {arch!r} is not supported (llama)")

    def get(k: str, default=None):
        return _field(reader, f"llama.{k}", default)

    hidden, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    if get("rope.scaling.type") not in (None, "none"):
        raise UnsupportedModel(f"GGUF rope scaling {get('rope.scaling.type')!r} is not supported")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    cfg = ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=n_heads,
        num_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(get("rope.dimension_count", hidden // n_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(int(x) for x in (eos, eot) if x is not None),
    )
    cfg.validate()
    return cfg


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """-> (config, float32 tensors under Hugging Face names)."""
    from gguf import GGUFReader

    from loraplex.engine.model.progress import LoadProgress

    reader = GGUFReader(str(path))
    cfg = gguf_config(reader)
    out: dict[str, torch.Tensor] = {}
    with LoadProgress(f"reading {path.name}", len(reader.tensors)) as progress:
        for t in reader.tensors:
            out.update([_tensor(t, cfg)])
            progress.advance()
    return cfg, out


def _tensor(t: Any, cfg: ModelConfig) -> tuple[str, torch.Tensor]:
    """One GGUF tensor -> (its Hugging Face name, float32 tensor)."""
    from gguf import quants

    w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    base, _, suffix = t.name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk":
        kind = _NAMES.get(parts[2])
        if kind is None:
            raise UnsupportedModel(f"GGUF tensor {t.name!r} is not a llama tensor")
        if kind == "self_attn.q_proj":
            w = _unpermute(w, cfg.num_heads)
        elif kind == "self_attn.k_proj":
            w = _unpermute(w, cfg.num_kv_heads)
        name = f"model.layers.{parts[1]}.{kind}.{suffix}"
    elif base in _TOP:
        name = f"{_TOP[base]}.{suffix}"
    elif base == "rope_freqs":
        raise UnsupportedModel("GGUF rope_freqs (llama3.1 rope scaling) is not supported")
    else:
        raise UnsupportedModel(f"GGUF tensor {t.name!r} is not a llama tensor")
    return name, torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
