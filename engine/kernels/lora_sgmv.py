"""SGMV shrink + expand of one projection group: ``y (+)= per token x @ A^T @ B^T``.

One op for what ``lora_shrink`` then ``lora_expand`` compute. On the per-token path (decode-like
batches, ``use_token_path``) it is one launch: the grid holds the shrink programs (token, p,
K slice) first, then the expand programs (token, N range, p); an expand program waits for its
token's K slices on a counter that the shrink programs bump (release / acquire), so the expand
of the first tokens streams B while later tokens are still shrinking, and the layer's launches
halve. The segment path runs the two kernels.

Counters: ``[2, P, T]`` int32 per (device, stream), zero between launches (the last expand
program of each (p, t) resets its pair). Blocks of a 1-D grid are dispatched in order, so
every shrink program is running or done before any expand program waits: no deadlock. Two
launches on one stream never overlap (a launch's programs touch the counters only after
``gdc_wait``, i.e. after the previous launch ended), and each stream has its own counters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.kernels._triton import HAVE_TRITON, gdc_launch_dependents, pdl_ok, tl, triton
from engine.kernels.lora_expand import (
    _expand_config,
    check_expand_args,
    lora_expand,
    lora_expand_ref,
)
from engine.kernels.lora_meta import LoraMeta
from engine.kernels.lora_shrink import (
    _shrink_config,
    check_shrink_args,
    lora_shrink,
    lora_shrink_ref,
    use_token_path,
)


def lora_sgmv_ref(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [slots, P, R, in]
    lora_b: torch.Tensor,  # [slots, N, R]  (scale folded in)
    ranks: torch.Tensor,  # [slots, P] int32
    out_offsets: Sequence[int],  # [P+1] host ints into N
    meta: LoraMeta,
    y: torch.Tensor,  # [T, N], updated in place
    accumulate: bool = True,  # False: y = the delta (zeros where no adapter applies)
) -> torch.Tensor:
    buf = lora_shrink_ref(x, lora_a, ranks, meta)
    return lora_expand_ref(buf, lora_b, ranks, out_offsets, meta, y, accumulate)


if HAVE_TRITON:
    from engine.kernels.lora_expand import _bgmv_expand_body
    from engine.kernels.lora_shrink import _bgmv_shrink_body

    @triton.jit(do_not_specialize=["T", "KS", "NS", "PREFETCH"])
    def _bgmv_sgmv_kernel(
        x_ptr,  # [T, K]
        a_ptr,  # [slots, P, R, K]
        b_ptr,  # [slots, N, R]
        ranks_ptr,  # [slots, P]
        buf_ptr,  # [KS, P, T, R] float32
        y_ptr,  # [T, N]
        token_slot_ptr,  # [T] int32, -1 = no adapter
        ctr_ptr,  # [2, P, T] int32, zero
        T,
        K,
        R,
        OFF1,
        OFF2,
        OFF3,
        OFF4,
        KS,
        K_PER_SPLIT,
        NS,  # N ranges per projection
        N_PER_PROG,
        P: tl.constexpr,
        stride_xt,
        stride_as,
        stride_ap,
        stride_ar,
        stride_bs,
        stride_bn,
        stride_yt,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_KS: tl.constexpr,
        USE_PDL: tl.constexpr,
        PREFETCH,
        LINE: tl.constexpr,
        EARLY: tl.constexpr,
        ACCUMULATE: tl.constexpr,
    ):
        if USE_PDL and EARLY:
            gdc_launch_dependents()
        pid = tl.program_id(0)
        n_shrink = T * P * KS
        if pid < n_shrink:  # token-major, so the first tokens' slices finish first
            t = pid // (P * KS)
            q = pid - t * (P * KS)
            p = q // KS
            _bgmv_shrink_body(
                x_ptr, a_ptr, ranks_ptr, buf_ptr, token_slot_ptr, ctr_ptr, t, p, q - p * KS,
                T, K, R, P, stride_xt, stride_as, stride_ap, stride_ar, K_PER_SPLIT,
                BLOCK_R, BLOCK_K, USE_PDL, PREFETCH, LINE, True, True,
            )  # fmt: skip
        else:
            e = pid - n_shrink
            t = e // (P * NS)
            q = e - t * (P * NS)
            p = q // NS
            _bgmv_expand_body(
                buf_ptr, b_ptr, ranks_ptr, y_ptr, token_slot_ptr, ctr_ptr, t, q - p * NS, p,
                T, R, OFF1, OFF2, OFF3, OFF4, KS, N_PER_PROG, P, stride_bs, stride_bn,
                stride_yt, BLOCK_N, BLOCK_R, BLOCK_KS, USE_PDL, ACCUMULATE, True,
            )  # fmt: skip


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``n`` for the current stream of ``device``."""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def lora_sgmv(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [slots, P, R, in]
    lora_b: torch.Tensor,  # [slots, N, R]  (scale folded in)
    ranks: torch.Tensor,  # [slots, P] int32
    out_offsets: Sequence[int],  # [P+1] host ints into N
    meta: LoraMeta,
    y: torch.Tensor,  # [T, N], updated in place
    accumulate: bool = True,
    early_launch: bool = True,  # lora_shrink's
    config: dict | None = None,  # tuning: fused, num_warps, shrink / expand (their configs)
) -> torch.Tensor:
    check_shrink_args(x, lora_a, ranks, meta)
    T, K = x.shape
    _, P, R, _ = lora_a.shape
    offs = check_expand_args(P, T, R, lora_b, ranks, out_offsets, meta, y)
    cfg = config or {}
    sc, ec = cfg.get("shrink"), cfg.get("expand")
    early_launch = cfg.get("early", early_launch)
    rows = use_token_path(T, meta)
    if not (rows and cfg.get("fused", True)) or T == 0 or meta.num_segments == 0:
        buf = lora_shrink(x, lora_a, ranks, meta, config=sc, early_launch=early_launch)
        return lora_expand(
            buf, lora_b, ranks, offs, meta, y, config=ec, accumulate=accumulate,
            early_launch=early_launch,
        )  # fmt: skip
    on_gpu = x.is_cuda
    block_r, block_k, k_per = _shrink_config(T, K, P, R, on_gpu, True, meta.block_m)
    max_out = max(offs[i + 1] - offs[i] for i in range(P))
    _, block_n, n_per = _expand_config(T, R, max_out, P, on_gpu, True, meta.block_m)
    if sc:
        block_k, k_per = sc.get("block_k", block_k), sc.get("k_per", k_per)
    if ec:
        block_n, n_per = ec.get("block_n", block_n), ec.get("n_per", n_per)
    k_per = min(k_per, triton.cdiv(K, block_k) * block_k)
    ks = triton.cdiv(K, k_per)
    ns = triton.cdiv(max_out, n_per)
    pdl = pdl_ok(x)
    buf = torch.empty(ks, P, T, R, dtype=torch.float32, device=x.device)
    ctr = _counters(x.device, 2 * P * T)
    offs5 = offs + [offs[-1]] * (5 - len(offs))
    _bgmv_sgmv_kernel[(T * P * ks + T * P * ns,)](
        x,
        lora_a,
        lora_b,
        ranks.contiguous(),
        buf,
        y,
        meta.token_slot,
        ctr,
        T,
        K,
        R,
        offs5[1],
        offs5[2],
        offs5[3],
        offs5[4],
        ks,
        k_per,
        ns,
        n_per,
        P,
        x.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_a.stride(2),
        lora_b.stride(0),
        lora_b.stride(1),
        y.stride(0),
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        BLOCK_KS=16,
        USE_PDL=pdl,
        PREFETCH=int(pdl and T <= 16),
        LINE=128 // x.element_size(),
        EARLY=early_launch,
        ACCUMULATE=accumulate,
        num_warps=cfg.get("num_warps", 8 if on_gpu else 4),
        num_stages=cfg.get("num_stages", 3),
        launch_pdl=pdl,
    )
    return y
