"""A launched step whose sampled tokens the host has not read yet (async scheduling).

The engine launches step n+1 before it reads step n's tokens: each sequence sampled in
step n carries a placeholder (-1) at the end of its token ids, and step n+1 reads the real
id on the device from step n's samples (``ScheduledBatch.gather``). Reading step n's
tokens (one sync) and turning them into outputs then runs while the GPU computes n+1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.engine.request_state import Choice, RequestState
from loraplex.engine.sampler import DeviceSample
from loraplex.engine.scheduler import SchedulerOutput
from loraplex.engine.sequence import Sequence

PLACEHOLDER = -1


@dataclass(eq=False)
class SampledRow:
    seq: Sequence
    state: RequestState
    choice: Choice
    index: int  # where its token goes in ``seq.token_ids``


class DevicePooled:
    """A step's pooled embeddings on their way to the host (copied as they are launched,
    read with the step's tokens)."""

    def __init__(self, pooled: torch.Tensor, states: list[RequestState]) -> None:
        self.states = states  # aligned with the rows of ``pooled``
        self._event = None
        if pooled.device.type == "cuda":
            host = torch.empty(pooled.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(pooled, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._host = host
        else:
            self._host = pooled.float()

    def resolve(self) -> list[bytes]:
        """Each row as little-endian float32 bytes (waits for the copy on CUDA)."""
        if self._event is not None:
            self._event.synchronize()
        rows = self._host.contiguous().numpy().astype("<f4", copy=False)
        return [row.tobytes() for row in rows]


@dataclass(eq=False)
class InFlight:
    rows: list[SampledRow]
    sample: DeviceSample | None  # None: nothing sampled (prefill chunks only)
    row_of: dict[int, int] = field(default_factory=dict)  # seq_id -> row of ``sample``
    pooled: DevicePooled | None = None  # embedding requests this step finished
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
