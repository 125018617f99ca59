"""SGMV expand: ``y[t, off_p:off_p+1] += buf[p, t, :r] @ lora_b[slot(t), off_p:off_p+1, :r].T``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.kernels.lora_meta import LoraMeta


def lora_expand_ref(
    buf: torch.Tensor,  # [P, T, R] float32
    lora_b: torch.Tensor,  # [slots, N, R]  (scale folded in)
    ranks: torch.Tensor,  # [slots, P] int32
    out_offsets: Sequence[int],  # [P+1] host ints into N
    meta: LoraMeta,
    y: torch.Tensor,  # [T, N], updated in place
) -> torch.Tensor:
    P = buf.shape[0]
    seg_start = meta.seg_start.tolist()
    seg_slot = meta.seg_slot.tolist()
    ranks_h = ranks.tolist()
    for s in range(len(seg_slot)):
        slot, a, b = seg_slot[s], seg_start[s], seg_start[s + 1]
        if slot < 0 or b <= a:
            continue
        toks = meta.sorted_tokens[a:b].long()
        for p in range(P):
            r = ranks_h[slot][p]
            if r:
                n0, n1 = out_offsets[p], out_offsets[p + 1]
                d = buf[p, toks, :r] @ lora_b[slot, n0:n1, :r].float().T
                y[toks, n0:n1] = (y[toks, n0:n1].float() + d).to(y.dtype)
    return y
