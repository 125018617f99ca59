"""The base model's shape: one typed value, read from an HF ``config.json`` dict or GGUF fields.

Served: the Llama family (Llama 2/3/3.1, Mistral and Mistral-Nemo, Qwen2, SmolLM2) and its
close relatives, each a flag on the one config: Qwen3 (``qk_norm``: RMSNorm over each q and k
head before rotary), Phi-3/Phi-4 (``fused_proj``: checkpoints and adapters name the fused
``qkv_proj`` / ``gate_up_proj``), Qwen3-MoE (``num_experts``: every layer's MLP is a top-k
softmax-routed mixture of SiLU-gated experts; attention as Qwen3). All are pre-norm decoders with RMSNorm, rotary (neox
style), GQA and a SiLU-gated MLP; ``head_dim`` is read from the config (not always hidden /
heads). Gemma 2 and Gemma 3 (text) are one more flag, ``gemma_norm``, with the
attention options of theirs that are fields of their own (a window, soft-caps, a scale, a
second rope base for local layers); see :class:`ModelConfig`. Everything else is refused by
name with :class:`UnsupportedModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ARCHS = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)
GEMMA_ARCHS = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# the projections a LoRA adapter may target, by checkpoint layout (PEFT's module names)
SPLIT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Qwen3-MoE: attention, and each expert's projections (PEFT: ``mlp.experts.<e>.gate_proj``);
# the router (``mlp.gate``) is not adapted
EXPERT_MODULES = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")
MOE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", *EXPERT_MODULES)


class UnsupportedModel(ValueError):
    """The checkpoint is not a model this engine can serve (architecture, rope type, ...)."""


@dataclass(frozen=True)
class RopeScaling:
    """``kind``: "default", "linear", "llama3" or "longrope" (Phi-3.5/Phi-4-mini: served at
    its original context, so with its short factors only, cos/sin scaled by
    ``attention_factor``); the other fields are used by those kinds."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q, k and v (not on o)
    qk_norm: bool = False  # Qwen3: RMSNorm (weight [head_dim]) on each q and k head
    fused_proj: bool = False  # Phi-3: qkv_proj and gate_up_proj, in checkpoints and adapters
    partial_rotary_factor: float = 1.0  # Phi-4-mini: rotary on the first 3/4 of each head
    # Qwen3-MoE (num_experts > 0): every layer's MLP is a mixture of experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # the top-k routing weights renormalized to sum to 1
    # Gemma 2/3: RMSNorm times (1 + w) in float32 (the loader stores 1 + w, float32), a norm
    # on the attention's and the MLP's output before each residual add and one before the
    # MLP, embeddings times sqrt(hidden) in the model dtype, the LoRA deltas of o and down
    # added before those norms
    gemma_norm: bool = False
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (Gemma's GeGLU)
    query_pre_attn_scalar: float | None = None  # attention scale scalar**-0.5 (Gemma)
    attn_logit_softcap: float | None = None  # scores = cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the logits (Gemma 2)
    # local attention: layer i sees the last ``sliding_window`` positions (itself included)
    # where ``sliding_layers[i]``; () or False, or no window: all positions (a local layer
    # keeps its own rope then)
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    local_rope_theta: float | None = None  # Gemma 3: local layers' rope base, no scaling
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that rotary turns (all but in Phi-4-mini)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(base) ** -0.5

    def layer_window(self, layer: int) -> int:
        """The sliding window of ``layer`` (0: it attends to every position)."""
        if self.sliding_window and layer < len(self.sliding_layers):
            return self.sliding_window if self.sliding_layers[layer] else 0
        return 0

    @property
    def adapter_modules(self) -> tuple[str, ...]:
        """The module names a PEFT adapter of this model targets."""
        if self.is_moe:
            return MOE_MODULES
        return FUSED_MODULES if self.fused_proj else SPLIT_MODULES

    def validate(self) -> None:
        checks = [
            (
                self.num_heads % self.num_kv_heads == 0,
                "num_heads must be a multiple of num_kv_heads",
            ),
            (self.head_dim % 2 == 0, "head_dim must be even (rotary)"),
            (
                self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim,
                "the rotary dims must be even and within head_dim",
            ),
            (
                self.rope_scaling.kind != "longrope"
                or len(self.rope_scaling.short_factor) == self.rotary_dim // 2,
                "longrope needs one short factor per rotary frequency",
            ),
            (self.num_layers >= 1 and self.hidden_size >= 1, "empty model"),
            (
                not self.is_moe or 1 <= self.num_experts_per_tok <= self.num_experts,
                "num_experts_per_tok must be within 1..num_experts",
            ),
            (
                # expert LoRA pages address each expert's rows in 64-element granules
                not self.is_moe
                or (self.hidden_size % 8 == 0 and self.moe_intermediate_size % 8 == 0),
                "hidden_size and moe_intermediate_size must be multiples of 8",
            ),
            (
                self.hidden_act in ("silu", "gelu_pytorch_tanh"),
                f"hidden_act {self.hidden_act!r} is not supported (silu, gelu_pytorch_tanh)",
            ),
            (
                not self.sliding_layers or len(self.sliding_layers) == self.num_layers,
                "sliding_layers needs one entry per layer",
            ),
            (
                self.sliding_window is None or self.sliding_window >= 1,
                "sliding_window must be positive (None: no window)",
            ),
            (
                self.local_rope_theta is None or len(self.sliding_layers) == self.num_layers,
                "a local rope base needs the local layers (sliding_layers)",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise UnsupportedModel(msg)

    def local_rope_inv_freq(self) -> torch.Tensor | None:
        """Gemma 3's local (sliding) layers' inverse frequencies: their own base, unscaled;
        None where every layer uses :meth:`rope_inv_freq`."""
        if self.local_rope_theta is None:
            return None
        d = self.rotary_dim
        return 1.0 / (
            self.local_rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
        )

    def rope_inv_freq(self) -> torch.Tensor:
        """The (scaled) rotary inverse frequencies, ``[rotary_dim / 2]`` float32."""
        d = self.rotary_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        rs = self.rope_scaling
        if rs.kind == "longrope":
            return inv / torch.tensor(rs.short_factor, dtype=torch.float32)
        if rs.kind == "linear":
            return inv / rs.factor
        if rs.kind != "llama3":
            return inv
        low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(medium, smoothed, scaled)


def _ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


def _rope_scaling(d: dict[str, Any]) -> tuple[float, RopeScaling]:
    """(theta, scaling) from either the transformers 5 ``rope_parameters`` or the older keys."""
    rp = d.get("rope_parameters") or {}
    old = d.get("rope_scaling") or {}
    theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    src = rp if rp.get("rope_type", "default") != "default" else old
    kind = src.get("rope_type", src.get("type", "default")) if src else "default"
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(src["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(src["factor"]),
            low_freq_factor=float(src["low_freq_factor"]),
            high_freq_factor=float(src["high_freq_factor"]),
            original_max_position_embeddings=int(src["original_max_position_embeddings"]),
        )
    if kind == "longrope":
        return theta, _longrope(d, src)
    raise UnsupportedModel(
        f"rope scaling type {kind!r} is not supported (default, linear, llama3, longrope)"
    )


def _longrope(d: dict[str, Any], src: dict[str, Any]) -> RopeScaling:
    """As transformers computes it for a context up to the original one (short factors)."""
    original = int(
        src.get("original_max_position_embeddings") or d["original_max_position_embeddings"]
    )
    factor = src.get("factor") or int(d.get("max_position_embeddings", original)) / original
    attention = src.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(
        kind="longrope",
        factor=float(factor),
        original_max_position_embeddings=original,
        short_factor=tuple(float(x) for x in src["short_factor"]),
        attention_factor=float(attention),
    )


def _partial_rotary(d: dict[str, Any], arch: str) -> float:
    """Rotary on part of each head: Phi-3's config reads it (Phi-4-mini: 0.75); refused by
    name elsewhere."""
    rp = d.get("rope_parameters") or {}
    factor = float(rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
    if factor != 1.0 and arch != "Phi3ForCausalLM":
        raise UnsupportedModel(f"partial_rotary_factor={factor:g} is not supported on {arch}")
    return factor


def _layer_kinds(d: dict[str, Any], arch: str, n_layers: int) -> tuple[bool, ...]:
    """Gemma: which layers are local (sliding), from ``layer_types`` or the pattern
    transformers derives without it (Gemma 2: every other layer from the first; Gemma 3:
    five local, then one global)."""
    types = d.get("layer_types")
    if not types:
        every = 2 if arch == "Gemma2ForCausalLM" else int(d.get("sliding_window_pattern", 6))
        return tuple(bool((i + 1) % every) for i in range(n_layers))
    return _kinds_of(types, n_layers)


def _kinds_of(types: list[str], n_layers: int) -> tuple[bool, ...]:
    """A config's ``layer_types`` -> which layers are local (sliding)."""
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown or len(types) != n_layers:
        raise UnsupportedModel(f"layer_types {sorted(unknown) or types} are not supported")
    return tuple(t == "sliding_attention" for t in types)


def _window_layers(d: dict[str, Any], n_layers: int, qwen: bool) -> tuple[bool, ...]:
    """Mistral and Qwen2/3 with a sliding window: which layers are local, from
    ``layer_types``, else as transformers derives them (Mistral every layer; Qwen from
    ``max_window_layers`` on)."""
    types = d.get("layer_types")
    if types:
        return _kinds_of(types, n_layers)
    first = int(d.get("max_window_layers", n_layers)) if qwen else 0
    return tuple(i >= first for i in range(n_layers))


def _window(v: Any) -> int | None:
    """A config's sliding window (null: none, the local layers then see every position)."""
    return None if v is None else int(v)


def _gemma(d: dict[str, Any], arch: str, n_layers: int) -> dict[str, Any]:
    """The ModelConfig fields of a Gemma 2/3 text config (keys absent: transformers'
    defaults). Gemma 3's rope is per layer type: scaled for global layers, its own base for
    local ones (``rope_parameters`` per type, or the older ``rope_local_base_freq``)."""
    if d.get("use_bidirectional_attention"):
        raise UnsupportedModel("use_bidirectional_attention=True (an encoder) is not supported")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    gemma2 = arch == "Gemma2ForCausalLM"
    out: dict[str, Any] = dict(
        gemma_norm=True,
        hidden_act=act,
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
        attn_logit_softcap=d.get("attn_logit_softcapping", 50.0 if gemma2 else None),
        final_logit_softcap=d.get("final_logit_softcapping", 30.0 if gemma2 else None),
        sliding_window=_window(d.get("sliding_window", 4096)),
        sliding_layers=_layer_kinds(d, arch, n_layers),
    )
    rp = d.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:  # transformers 5, per layer type
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
        theta, scaling = _rope_scaling({"rope_parameters": {"rope_theta": 1e6, **full}})
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModel("rope scaling on local (sliding) layers is not supported")
        local_theta = float(local.get("rope_theta", 10000.0))
    else:
        theta, scaling = _rope_scaling({"rope_theta": 1e6 if not gemma2 else 1e4, **d})
        local_theta = float(d.get("rope_local_base_freq", 10000.0))
    out.update(rope_theta=theta, rope_scaling=scaling)
    if not gemma2:
        out["local_rope_theta"] = local_theta
    elif scaling.kind != "default":
        raise UnsupportedModel("rope scaling on Gemma 2 is not supported")
    for key in ("attn_logit_softcap", "final_logit_softcap"):
        out[key] = float(out[key]) if out[key] else None
    return out


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Build from a parsed HF ``config.json``."""
    archs = d.get("architectures") or [_MODEL_TYPES.get(d.get("model_type", ""), "?")]
    arch = archs[0]
    if arch == "Gemma3ForConditionalGeneration":  # its text layers live under language_model
        raise UnsupportedModel(
            "Gemma3ForConditionalGeneration (the multimodal checkpoint) is not supported; "
            "a Gemma3ForCausalLM checkpoint of its text model is"
        )
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModel(
            f"architecture {arch!r} is not supported ({', '.join(SUPPORTED_ARCHS)})"
        )
    if d.get("mlp_bias"):
        raise UnsupportedModel("mlp_bias=True is not supported")
    gemma = arch in GEMMA_ARCHS
    if not gemma and d.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {d['hidden_act']!r} is not supported (silu)")
    is_qwen = arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
    moe = _moe(d) if arch == "Qwen3MoeForCausalLM" else {}
    if d.get("attention_bias") and arch != "Qwen2ForCausalLM":
        raise UnsupportedModel("attention_bias=True (bias on o_proj too) is not supported")
    partial = _partial_rotary(d, arch)
    n_heads = int(d["num_attention_heads"])
    n_layers = int(d["num_hidden_layers"])
    extra = _gemma(d, arch, n_layers) if gemma else {}
    theta, scaling = (extra["rope_theta"], extra["rope_scaling"]) if gemma else _rope_scaling(d)
    max_pos = int(d.get("max_position_embeddings", 4096))
    if scaling.kind == "longrope":  # the long factors are not served: the original context
        max_pos = min(max_pos, scaling.original_max_position_embeddings)
    window = d.get("sliding_window")
    if (
        window
        and int(window) < max_pos
        and not gemma
        and (not is_qwen or d.get("use_sliding_window"))
    ):
        # served windowed at the full context (the layers' kinds as transformers has them);
        # a window as long as the context is none (Phi-4-mini's 262,144)
        extra = {**extra, "sliding_window": int(window),
                 "sliding_layers": _window_layers(d, n_layers, is_qwen)}  # fmt: skip
    cfg = ModelConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d.get("intermediate_size") or 0),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(d.get("head_dim") or d["hidden_size"] // n_heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
        qkv_bias=arch == "Qwen2ForCausalLM",
        # Qwen3 and Qwen3-MoE: per-head q/k RMSNorm; Gemma 3: the same with (1 + w) norms
        qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
        fused_proj=arch == "Phi3ForCausalLM",
        partial_rotary_factor=partial,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_ids(d.get("eos_token_id")),
        architecture=arch,
        **moe,
        **{k: v for k, v in extra.items() if k not in ("rope_theta", "rope_scaling")},
    )
    cfg.validate()
    return cfg


def _moe(d: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE's expert fields. Every layer sparse (as in Qwen3-30B-A3B and -235B-A22B):
    dense layers between the sparse ones (``mlp_only_layers``, ``decoder_sparse_step``) are
    refused by name."""
    if d.get("mlp_only_layers") or int(d.get("decoder_sparse_step", 1)) != 1:
        raise UnsupportedModel(
            "Qwen3-MoE with dense MLP layers (mlp_only_layers, decoder_sparse_step != 1) "
            "is not supported"
        )
    return {
        "num_experts": int(d.get("num_experts") or d["num_local_experts"]),  # 5.x: local
        "num_experts_per_tok": int(d["num_experts_per_tok"]),
        "moe_intermediate_size": int(d["moe_intermediate_size"]),
        "norm_topk_prob": bool(d.get("norm_topk_prob", False)),
    }
