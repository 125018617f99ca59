"""A launched step whose sampled tokens the host has not read yet (async scheduling).

The engine launches step n+1 before it reads step n's tokens: each sequence sampled in
step n carries a placeholder (-1) at the end of its token ids, and step n+1 reads the real
id on the device from step n's samples (``ScheduledBatch.gather``). Reading step n's
tokens (one sync) and turning them into outputs then runs while the GPU computes n+1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.request_state import Choice, RequestState
from engine.sampler import DeviceSample
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence

PLACEHOLDER = -1


@dataclass(eq=False)
class SampledRow:
    seq: Sequence
    state: RequestState
    choice: Choice
    index: int  # where its token goes in ``seq.token_ids``


@dataclass(eq=False)
class InFlight:
    rows: list[SampledRow]
    sample: DeviceSample | None  # None: nothing sampled (prefill chunks only)
    row_of: dict[int, int] = field(default_factory=dict)  # seq_id -> row of ``sample``
    constrained: bool = False  # some row was sampled under a grammar's mask

    @property
    def tokens(self) -> torch.Tensor | None:
        return None if self.sample is None else self.sample.token_ids


def gather_for(out: SchedulerOutput, prev: InFlight | None) -> list[tuple[int, int]]:
    """(token index in the batch, row in ``prev``'s samples) for each chunk whose last
    token is a placeholder for what ``prev`` samples."""
    gather = []
    offset = 0
    for seq, chunk in zip(out.seqs, out.batch.chunks, strict=True):
        offset += len(chunk.token_ids)
        if chunk.token_ids[-1] != PLACEHOLDER:
            continue
        row = None if prev is None else prev.row_of.get(seq.seq_id)
        if row is None:
            raise RuntimeError(f"seq {seq.seq_id}: a placeholder with no step in flight")
        gather.append((offset - 1, row))
    return gather
