"""SGMV shrink: ``buf[p, t, :r] = x[t] @ lora_a[slot(t), p, :r].T`` for every projection p."""

from __future__ import annotations

import torch

from engine.kernels.lora_meta import LoraMeta


def lora_shrink_ref(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [slots, P, R, in]
    ranks: torch.Tensor,  # [slots, P] int32
    meta: LoraMeta,
) -> torch.Tensor:  # [P, T, R] float32
    T = x.shape[0]
    _, P, R, _ = lora_a.shape
    buf = torch.zeros(P, T, R, dtype=torch.float32, device=x.device)
    seg_start = meta.seg_start.tolist()
    seg_slot = meta.seg_slot.tolist()
    ranks_h = ranks.tolist()
    for s in range(len(seg_slot)):
        slot, a, b = seg_slot[s], seg_start[s], seg_start[s + 1]
        if slot < 0 or b <= a:
            continue
        toks = meta.sorted_tokens[a:b].long()
        xs = x[toks].float()
        for p in range(P):
            r = ranks_h[slot][p]
            if r:
                buf[p, toks, :r] = xs @ lora_a[slot, p, :r].float().T
    return buf
