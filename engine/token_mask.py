"""Token masks of constrained rows, applied to a batch's logits in one batched op.

A mask is a bitmask, 32 token ids per int32 (bit ``i % 32`` of word ``i // 32``: the layout
llguidance and xgrammar fill). Only the listed rows are touched; the other rows of the
batch (unconstrained requests) keep their logits.
"""

from __future__ import annotations

import torch

from loraplex.engine.devices import to_device


class MaskBatch:
    """Token masks for the constrained rows of one sampling batch."""

    def __init__(self, rows: list[int], bitmask: torch.Tensor) -> None:
        self.rows = rows  # rows of the logits, one per line of ``bitmask``
        self.bitmask = bitmask  # [len(rows), ceil(V / 32)] int32, on the logits' device


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, W] int32 bitmask -> [R, vocab] bool (ids past the mask's width: not allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab].bool()
    if allowed.shape[1] < vocab:
        pad = torch.zeros(allowed.shape[0], vocab - allowed.shape[1], dtype=torch.bool)
        allowed = torch.cat([allowed, pad.to(allowed.device)], dim=1)
    return allowed


def apply_token_masks(logits: torch.Tensor, masks: MaskBatch) -> torch.Tensor:
    """``logits`` with every token a mask forbids at -inf, on the masked rows only."""
    allowed = allowed_tokens(masks.bitmask, logits.shape[1])
    idx = to_device(torch.tensor(masks.rows, dtype=torch.long), logits.device)
    rows = logits.index_select(0, idx).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, idx, rows)
