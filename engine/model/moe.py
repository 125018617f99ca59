"""A mixture-of-experts MLP (Qwen3-MoE) with LoRA on every expert, batched across adapters.

Routing: softmax over the router's logits, the top-k experts per token, their weights
renormalized when ``norm_topk_prob`` (as transformers' Qwen3MoeTopKRouter). The experts run
as two grouped GEMMs by expert (:func:`engine.kernels.moe_gemm`) around SiLU-and-mul; the
outputs of a token's k experts are summed with the routing weights.

Expert LoRA: each routed (token, k) pair is one row of the SGMV kernels, its *virtual slot*
``slot * E + expert`` (the pool's expert groups hold a page table and rank table of
``slots * E`` rows, one per adapter and expert): shrink then expand over (adapter, expert)
segments, the same kernels as the dense projections. The shrinks read each pair's input as
its token's row (``row_div``: no repeated copy of the rows). The gate/up deltas are added to
the pairs' gate/up outputs before the activation, the down deltas to the pairs' outputs
before the weighted sum. The router is not adapted.

Which SGMV kernels (:func:`expert_grouped`): where a step's pairs fill (adapter, expert)
segments (prefill, mixed steps with long chunks), the segment ones (tensor-core tiles of one
(adapter, expert)'s pairs: its A and B read once per tile, not once per pair) over the pairs
grouped on the device (:meth:`LoraMeta.grouped`: no host sync, shapes from the pair count
only); else (decode: a few pairs per (adapter, expert)) the per-token ones.
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


# The fewest (token, expert) pairs a step's expert LoRA takes the segment kernels from. One
# Qwen3-30B-A3B layer on the H100 (bench_moe_lora.py, rank 8, Zipf adapters), per-token
# against grouped, ms: 32 adapters 1,024 tokens (8,192 pairs, 2 per (adapter, expert))
# 1.217 / 1.320, 1,536 tokens 1.476 / 1.429, 2,048 tokens 1.808 / 1.603; 8 adapters 512
# tokens (4 per (adapter, expert)) 0.851 / 0.918. Below ~10,000 pairs the device grouping's
# ~25 small ops cost more than the repeated A and B reads they save.
GROUPED_MIN_PAIRS = 12_288


def expert_grouped(meta: LoraMeta, config: ModelConfig, decode: bool) -> bool:
    """The segment kernels for a step's expert LoRA: when its adapters' tokens route at least
    2 pairs per (adapter, expert) on average (:func:`use_token_path`'s rule over each
    adapter's E experts) and :data:`GROUPED_MIN_PAIRS` in all (host ints of the step's
    meta). Decode steps take the per-token kernels (a graph's meta is padded: its counts are
    bounds; and no decode batch reaches that many pairs)."""
    pairs = meta.num_lora_tokens * config.num_experts_per_tok
    need = max(2 * meta.num_segments * config.num_experts, GROUPED_MIN_PAIRS)
    return not decode and pairs >= need


def expert_meta(
    meta: LoraMeta,
    ids: torch.Tensor,
    num_experts: int,
    x: torch.Tensor,
    *,
    grouped: bool,
    rows: int,
) -> LoraMeta:
    """The (token, k) pairs' meta over virtual slots ``slot * E + expert`` (-1: no adapter).

    The Triton path builds it on the device (no sync: the expert ids live there), grouped
    for the segment kernels or for the per-token ones (module docstring); ``rows``: the
    virtual slots (``slots * E``), a bound on the segments. The reference path groups
    segments on the host."""
    slot = meta.token_slot.to(ids.device).long()[:, None]
    vslot = torch.where(slot >= 0, slot * num_experts + ids.long(), -1).reshape(-1)
    if not K.use_triton(x):
        return build_lora_meta(vslot.cpu()).to(x.device)
    if grouped:
        return LoraMeta.grouped(vslot, rows)
    return LoraMeta.per_token(vslot.to(torch.int32))


def _lora(
    x: torch.Tensor,
    group: LoraGroup,
    offsets: list[int],
    meta: LoraMeta,
    y: torch.Tensor,
    row_div: int = 1,
    beside: bool = False,
) -> None:
    """``y`` += the group's LoRA of ``x``; ``beside``: ``y`` = the delta (store mode, zero rows
    where no adapter applies), launched as kernels beside another stream's GEMM."""
    early = not beside
    buf = K.lora_shrink(
        x, group.a, group.ranks, group.pages, meta, row_div=row_div, early_launch=early
    )
    K.lora_expand(
        buf, group.b, group.ranks, group.b_table, offsets, meta, y, accumulate=not beside,
        early_launch=early, b_offsets=group.b_offsets,
    )  # fmt: skip


class SideStream:
    """Work issued inside ``with``-blocks of one of these runs on ``stream`` (forked from the
    current stream at entry) beside what the current stream issues next; :meth:`join` makes
    the current stream wait for it. ``stream`` None: in line."""

    def __init__(self, stream: torch.cuda.Stream | None):
        self.stream = stream

    def __enter__(self) -> None:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()

    def __exit__(self, *exc) -> None:
        if self.stream is not None:
            self._ctx.__exit__(*exc)

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


def moe_mlp(
    h: torch.Tensor,  # [T, H], normed
    router: torch.Tensor,  # [E, H]
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
    config: ModelConfig,
    groups: dict[str, LoraGroup],  # the expert groups this step's adapters use (may be empty)
    offsets: dict[str, list[int]],
    meta: LoraMeta | None,
    *,
    grouped: bool = False,  # the expert LoRA's kernels: segment or per-token (docstring)
    beside: bool = False,  # the expert LoRA as deltas beside the grouped GEMMs
    side_stream: torch.cuda.Stream | None = None,  # beside: their stream (None: in line)
    fuse_act: bool = True,  # grouped, in line: the gate/up expand inside the activation
) -> torch.Tensor:  # [T, H]
    """``beside``: each expert group's LoRA writes a delta (store mode, no early launch) on
    ``side_stream`` while the main stream runs that group's grouped GEMM; the gate/up delta
    goes into the activation (``silu_and_mul``'s delta), the down delta is added to the
    pairs' outputs before the weighted sum. The same result as in line. Grouped and in line
    (prefill steps) with ``fuse_act``, the gate/up delta is added inside the activation
    (``lora_silu_and_mul``) instead of into the GEMM's ``[T * k, 2I]`` output."""
    T, top_k, E = h.shape[0], config.num_experts_per_tok, config.num_experts
    weights, ids = route(h, router, config)
    blocks = K.moe_blocks(ids, E)
    pmeta = None
    if groups and meta is not None:
        rows = next(iter(groups.values())).ranks.shape[0]
        pmeta = expert_meta(meta, ids, E, h, grouped=grouped, rows=rows)
    g_up, g_down = "experts_gate_up", "experts_down"
    lora_up = pmeta is not None and g_up in groups
    lora_down = pmeta is not None and g_down in groups
    side = SideStream(side_stream if beside else None)
    d_up = d_down = None
    if beside and lora_up:  # allocated on the main stream, written beside
        d_up = torch.empty(T * top_k, gate_up.shape[1], dtype=h.dtype, device=h.device)
        with side:  # pair q reads h[q // k]
            _lora(h, groups[g_up], offsets[g_up], pmeta, d_up, row_div=top_k, beside=True)
    inter = K.moe_gemm(h, gate_up, ids, False, blocks)  # [T * k, 2I]
    if lora_up and not beside and grouped and fuse_act:  # the segment path's tiles: fused
        g = groups[g_up]
        buf = K.lora_shrink(h, g.a, g.ranks, g.pages, pmeta, row_div=top_k)
        act = K.lora_silu_and_mul(inter, buf, g.b, g.ranks, g.b_table, pmeta, False, g.b_offsets)
    else:
        if lora_up and not beside:
            _lora(h, groups[g_up], offsets[g_up], pmeta, inter, row_div=top_k)
        side.join()
        act = K.silu_and_mul(inter, d_up)  # [T * k, I]
    if beside and lora_down:
        d_down = torch.empty(T * top_k, down.shape[1], dtype=h.dtype, device=h.device)
        with side:
            _lora(act, groups[g_down], offsets[g_down], pmeta, d_down, beside=True)
    out = K.moe_gemm(act, down, ids, True, blocks)  # [T * k, H]
    if lora_down and not beside:
        _lora(act, groups[g_down], offsets[g_down], pmeta, out)
    side.join()
    if d_down is not None:
        out = out + d_down
    return (out.view(T, top_k, -1) * weights[:, :, None]).sum(dim=1)
