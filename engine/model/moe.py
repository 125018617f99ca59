"""A mixture-of-experts MLP (Qwen3-MoE) with LoRA on every expert, batched across adapters.

Routing: softmax over the router's logits, the top-k experts per token, their weights
renormalized when ``norm_topk_prob`` (as transformers' Qwen3MoeTopKRouter). The experts run
as two grouped GEMMs by expert (:func:`engine.kernels.moe_gemm`) around SiLU-and-mul; the
outputs of a token's k experts are summed with the routing weights.

Expert LoRA: each routed (token, k) pair is one row of the SGMV kernels, its *virtual slot*
``slot * E + expert`` (the pool's expert groups hold a page table and rank table of
``slots * E`` rows, one per adapter and expert): shrink then expand over (adapter, expert)
segments, the same kernels as the dense projections. The gate/up deltas are added to the
pairs' gate/up outputs before the activation, the down deltas to the pairs' outputs before
the weighted sum. The router is not adapted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplex.engine import kernels as K
from loraplex.engine.kernels import LoraMeta, build_lora_meta
from loraplex.engine.lora.pool import LoraGroup
from loraplex.engine.model.config import ModelConfig


def route(h: torch.Tensor, router: torch.Tensor, config: ModelConfig):
    """-> (weights ``[T, k]`` in h's dtype, expert ids ``[T, k]`` int32)."""
    probs = torch.softmax(F.linear(h, router).float(), dim=-1)
    top, ids = torch.topk(probs, config.num_experts_per_tok, dim=-1)
    if config.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(h.dtype), ids.to(torch.int32)


def expert_meta(meta: LoraMeta, ids: torch.Tensor, num_experts: int, x: torch.Tensor) -> LoraMeta:
    """The (token, k) pairs' meta over virtual slots ``slot * E + expert`` (-1: no adapter).

    The Triton path takes the per-token kernels, built on the device (no sync: the expert
    ids live there); the reference path groups segments on the host."""
    slot = meta.token_slot.to(ids.device).long()[:, None]
    vslot = torch.where(slot >= 0, slot * num_experts + ids.long(), -1).reshape(-1)
    if K.use_triton(x):
        return LoraMeta.per_token(vslot.to(torch.int32))
    return build_lora_meta(vslot.cpu()).to(x.device)


def _lora(
    x: torch.Tensor, group: LoraGroup, offsets: list[int], meta: LoraMeta, y: torch.Tensor
) -> None:
    buf = K.lora_shrink(x, group.a, group.ranks, group.pages, meta)
    b_pages = group.b_pages if group.b_pages is not None else group.pages
    K.lora_expand(buf, group.b, group.ranks, b_pages, offsets, meta, y, b_offsets=group.b_offsets)


def moe_mlp(
    h: torch.Tensor,  # [T, H], normed
    router: torch.Tensor,  # [E, H]
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
    config: ModelConfig,
    groups: dict[str, LoraGroup],  # the expert groups this step's adapters use (may be empty)
    offsets: dict[str, list[int]],
    meta: LoraMeta | None,
) -> torch.Tensor:  # [T, H]
    T, top_k, E = h.shape[0], config.num_experts_per_tok, config.num_experts
    weights, ids = route(h, router, config)
    blocks = K.moe_blocks(ids, E)
    inter = K.moe_gemm(h, gate_up, ids, False, blocks)  # [T * k, 2I]
    pmeta = expert_meta(meta, ids, E, h) if groups and meta is not None else None
    if pmeta is not None and "experts_gate_up" in groups:
        xs = h.repeat_interleave(top_k, dim=0)  # each pair's input row
        _lora(xs, groups["experts_gate_up"], offsets["experts_gate_up"], pmeta, inter)
    act = K.silu_and_mul(inter)  # [T * k, I]
    out = K.moe_gemm(act, down, ids, True, blocks)  # [T * k, H]
    if pmeta is not None and "experts_down" in groups:
        _lora(act, groups["experts_down"], offsets["experts_down"], pmeta, out)
    return (out.view(T, top_k, -1) * weights[:, :, None]).sum(dim=1)
