"""The served base model's shape, as adapter validation needs it: plain ints and names.

The app builds one from the engine's model config (``BaseModelSpec.from_hf_config``); the
validator checks every LoRA tensor against it without importing the engine or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Llama-family decoder layer (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3): the projections an
# adapter targets.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Phi-3 / Phi-4 hold q/k/v and gate/up fused, and PEFT adapters target the fused modules.
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_FUSED_ARCHS = ("Phi3ForCausalLM",)
_FUSED_TYPES = ("phi3",)
# Qwen3-MoE: attention and each expert's projections (``mlp.experts.<e>.gate_proj``); the
# router ``mlp.gate`` is not adaptable
EXPERTS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")
_MOE_ARCHS = ("Qwen3MoeForCausalLM",)
_MOE_TYPES = ("qwen3_moe",)
# Gemma 2/3 configs may leave head_dim to transformers' default (256, not hidden / heads)
_HEAD_DIM_256_TYPES = ("gemma2", "gemma3_text")


@dataclass(frozen=True)
class ModuleShape:
    parent: str  # "self_attn" or "mlp"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class BaseModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    modules: tuple[str, ...] = ATTENTION + MLP  # adaptable: ATTENTION + MLP, FUSED, or MoE's
    num_experts: int = 0  # MoE: experts per layer
    moe_intermediate_size: int = 0

    def module_shape(self, module: str) -> ModuleShape | None:
        """``(parent, in, out)`` of one projection, or None if the engine cannot adapt it."""
        if module not in self.modules:
            return None
        h, i, mi = self.hidden_size, self.intermediate_size, self.moe_intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": ModuleShape("self_attn", h, q),
            "k_proj": ModuleShape("self_attn", h, kv),
            "v_proj": ModuleShape("self_attn", h, kv),
            "o_proj": ModuleShape("self_attn", q, h),
            "gate_proj": ModuleShape("mlp", h, i),
            "up_proj": ModuleShape("mlp", h, i),
            "down_proj": ModuleShape("mlp", i, h),
            "qkv_proj": ModuleShape("self_attn", h, q + 2 * kv),
            "gate_up_proj": ModuleShape("mlp", h, 2 * i),
            "experts.gate_proj": ModuleShape("mlp", h, mi),
            "experts.up_proj": ModuleShape("mlp", h, mi),
            "experts.down_proj": ModuleShape("mlp", mi, h),
        }
        return shapes.get(module)

    @classmethod
    def from_hf_config(cls, name: str, config: Mapping[str, Any]) -> BaseModelSpec:
        """From a Llama-style ``config.json`` (``hidden_size``, ``num_attention_heads``...);
        the module names from its architecture (Phi-3's fused ones)."""
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        archs = config.get("architectures") or ()
        fused = any(a in _FUSED_ARCHS for a in archs) or config.get("model_type") in _FUSED_TYPES
        moe = any(a in _MOE_ARCHS for a in archs) or config.get("model_type") in _MOE_TYPES
        modules = ATTENTION + EXPERTS if moe else FUSED if fused else ATTENTION + MLP
        experts = config.get("num_experts") or config.get("num_local_experts") or 0
        default_head_dim = 256 if config.get("model_type") in _HEAD_DIM_256_TYPES else None
        return cls(
            name=name,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(config.get("intermediate_size") or 0),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or default_head_dim or hidden // heads),
            modules=modules,
            num_experts=int(experts) if moe else 0,
            moe_intermediate_size=int(config.get("moe_intermediate_size") or 0) if moe else 0,
        )
