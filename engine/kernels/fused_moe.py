"""Grouped GEMM by expert (the two GEMMs of a mixture-of-experts MLP).

``out[q] = x[q // top_k] @ w[e(q)].T`` (``pairs_input=False``: the gate/up GEMM, each token's
row read once per routed expert) or ``out[q] = x[q] @ w[e(q)].T`` (``pairs_input=True``: the
down GEMM over the per-pair activations), for every (token, k) pair ``q = t * top_k + k``
routed to expert ``e(q) = topk_ids[t, k]``.

The Triton path follows vLLM's fused_moe: :func:`moe_blocks` sorts the pairs by expert on the
device (no host sync, shapes fixed by the pair count: CUDA-graph safe) and pads each expert's
run to a multiple of ``BLOCK_M``; one program per (block of one expert's pairs, N tile)
multiplies that block by its expert's weight with tensor-core dots. Blocks past the padded
total exit at once. The reference loops over the experts that got pairs (CPU path, tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.engine.kernels._triton import HAVE_TRITON, cdiv, tl, triton


@dataclass
class MoeBlocks:
    """Pairs sorted by expert, padded per expert to ``block_m`` (built on the device)."""

    sorted_pairs: torch.Tensor  # [cap] int32: pair ids; num_pairs marks padding
    block_expert: torch.Tensor  # [cap / block_m] int32: each block's expert
    num_padded: torch.Tensor  # [1] int32: rows in use (a multiple of block_m)
    num_pairs: int
    block_m: int


def moe_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block, from the pairs an expert gets on average: small blocks when experts
    get few (decode: less padding), large for prefill (more reuse of each weight tile)."""
    avg = num_pairs / num_experts
    return 16 if avg <= 16 else 32 if avg <= 64 else 64


def moe_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeBlocks:
    """Sort the ``[T, top_k]`` pairs by expert (stable) and pad each expert's run.

    At most ``min(E, pairs)`` experts get pairs, each padded by under ``block_m`` rows: the
    capacity ``pairs + min(E, pairs) * (block_m - 1)`` bounds every routing of ``pairs``."""
    flat = topk_ids.reshape(-1).long()
    n, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    pos = pad_end[sorted_e] - padded[sorted_e] + torch.arange(n, device=dev) - start[sorted_e]
    cap = n + min(num_experts, n) * (block_m - 1)
    cap = (cap + block_m - 1) // block_m * block_m
    sorted_pairs = torch.full((cap,), n, dtype=torch.int32, device=dev)
    sorted_pairs[pos] = order.to(torch.int32)
    first_row = torch.arange(0, cap, block_m, device=dev)
    block_expert = torch.searchsorted(pad_end, first_row, right=True).clamp_(max=num_experts - 1)
    return MoeBlocks(
        sorted_pairs,
        block_expert.to(torch.int32),
        pad_end[-1:].to(torch.int32),
        n,
        block_m,
    )


def moe_gemm_ref(
    x: torch.Tensor,  # [T, K] or [T * top_k, K] (pairs_input)
    w: torch.Tensor,  # [E, N, K]
    topk_ids: torch.Tensor,  # [T, top_k] int
    pairs_input: bool,
    blocks: MoeBlocks | None = None,  # unused: the Triton path's sorting
) -> torch.Tensor:  # [T * top_k, N]
    flat = topk_ids.reshape(-1).long()
    top_k = topk_ids.shape[1]
    out = torch.zeros(flat.numel(), w.shape[1], dtype=x.dtype, device=x.device)
    for e in torch.unique(flat).tolist():
        pairs = torch.nonzero(flat == e).flatten()
        rows = x[pairs] if pairs_input else x[pairs // top_k]
        out[pairs] = (rows.float() @ w[e].float().T).to(x.dtype)
    return out


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["num_pairs"])
    def _moe_gemm_kernel(
        x_ptr,  # [rows, K]
        w_ptr,  # [E, N, K]
        out_ptr,  # [pairs, N]
        sorted_ptr,  # [cap] int32
        block_expert_ptr,  # [cap / BLOCK_M] int32
        num_padded_ptr,  # [1] int32
        num_pairs,
        N,
        K,
        stride_xm,
        stride_we,
        stride_wn,
        stride_om,
        DIV: tl.constexpr,  # top_k (x holds tokens) or 1 (x holds pairs)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + offs_m)
        live = pair < num_pairs
        row = (pair // DIV).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + row[:, None] * stride_xm
        w_cols = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mk = kk < K
            a = tl.load(x_rows + kk[None, :], mask=live[:, None] & mk[None, :], other=0.0)
            b = tl.load(w_cols + kk[:, None], mask=mask_n[None, :] & mk[:, None], other=0.0)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        out = out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=live[:, None] & mask_n[None, :])


def moe_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    topk_ids: torch.Tensor,
    pairs_input: bool,
    blocks: MoeBlocks | None = None,
) -> torch.Tensor:
    """Triton grouped GEMM (see the module docstring); ``blocks`` from :func:`moe_blocks`
    (built here when not given; a layer shares one between its two GEMMs)."""
    E, N, K = w.shape
    T, top_k = topk_ids.shape
    if x.shape[1] != K or x.shape[0] != (T * top_k if pairs_input else T):
        raise ValueError(f"x {tuple(x.shape)} does not fit w {tuple(w.shape)} and {T}x{top_k}")
    if x.dtype != w.dtype or x.stride(1) != 1 or w.stride(2) != 1:
        raise ValueError("x and w: one dtype, contiguous last dimension")
    n = T * top_k
    out = torch.empty(n, N, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    if blocks is None:
        blocks = moe_blocks(topk_ids, E, moe_block_m(n, E))
    on_gpu = x.is_cuda
    block_n = 128 if on_gpu and N >= 128 else 32
    block_k = 64 if on_gpu else 32
    grid = (blocks.block_expert.shape[0], cdiv(N, block_n))
    _moe_gemm_kernel[grid](
        x,
        w,
        out,
        blocks.sorted_pairs,
        blocks.block_expert,
        blocks.num_padded,
        n,
        N,
        K,
        x.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        DIV=1 if pairs_input else top_k,
        BLOCK_M=blocks.block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32,
        num_warps=4,
        num_stages=3 if on_gpu else 1,
    )
    return out
