"""One sequence of tokens as the scheduler and block manager see it: ints only.

A request with ``n`` choices owns ``n`` sequences; they share nothing here but the
``request_id``. ``token_ids`` is the prompt followed by the generated tokens; the KV of
the first ``num_computed_tokens`` of them lives in the blocks of ``block_table``. With a
step in flight, its last ``num_pending`` tokens are placeholders (-1) for what that step
samples: the next step reads them on the device (``ScheduledBatch.gather``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n choices
    arrival: int  # admission order; smaller is older (preemption takes the largest)
    token_ids: list[int]
    prompt_len: int
    adapter_key: str | None = None
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    # a model with sliding-window layers (block_manager.WindowedBlocks): the tables of
    # their layer groups, each as long as block_table; those before local_start are given
    # back (0)
    local_tables: list[list[int]] = field(default_factory=list)
    local_start: int = 0
    hold_local: bool = False  # keep them: siblings fork off this prompt (n > 1)
    block_hashes: list[bytes] = field(default_factory=list)  # chain hashes of full blocks (memo)
    num_committed_blocks: int = 0  # leading blocks already offered to the prefix cache
    slot: int = -1  # GPU LoRA slot while running with an adapter (pinned)
    waited_steps: int = 0  # steps spent held back in the waiting queue
    # tokens at the end of ``token_ids`` that a step in flight samples (placeholders, -1)
    num_pending: int = 0
    max_total: int = 1 << 62  # prompt + the most tokens it may generate (scheduler's stop)
    embed: bool = False  # an embedding request: its last prompt chunk pools, never samples
    # fairness (engine/fairness.py): an opaque key, its weight, a priority tier (lower first)
    fair_key: str = ""
    fair_weight: float = 1.0
    priority_tier: int = 1
    fair_counted: bool = False  # counted among its key's active sequences
    queued_at: float = 0.0  # perf_counter when the engine received it (0: when first queued)
    queued_step: int = -1  # the scheduler's step count when first queued
    started: bool = False  # scheduled at least once

    @property
    def priority(self) -> tuple[int, int]:
        return (self.arrival, self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.prompt_len]
