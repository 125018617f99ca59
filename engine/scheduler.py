"""Continuous batching: who runs this step, and how many of their tokens. No torch.

Every sequence needs ``num_tokens - num_computed_tokens`` tokens computed (a prompt, a
rest of a prompt, or the one newest token); one step computes at most
``max_num_batched_tokens`` of them over at most ``max_num_seqs`` sequences, so long
prompts are prefilled in chunks. Running sequences go first, oldest first; when blocks
run out the newest running sequence is preempted (its blocks freed, recomputed later).
Waiting sequences are admitted first come first served; one whose adapter is still
loading is skipped without holding up the rest; one whose adapter cannot get GPU pages
(the rest are pinned by running work) is skipped for at most ``aging_steps`` steps, after
which nobody behind it is admitted until it is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter

from loraplex.engine.batch import ScheduledBatch, SeqChunk
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.lora.slots import PageNeed, SlotTable
from loraplex.engine.sequence import SeqStatus, Sequence

_priority = attrgetter("arrival", "index")  # = Sequence.priority, read in C


@dataclass
class SchedulerOutput:
    batch: ScheduledBatch
    seqs: list[Sequence]  # aligned with batch.chunks
    slot_writes: list[tuple[int, str]] = field(default_factory=list)  # (slot, adapter key)
    preempted: list[Sequence] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)  # adapter keys that lost their pages

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        slots: SlotTable,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        aging_steps: int,
        adapter_pages: Callable[[str], PageNeed] = lambda key: {},
    ) -> None:
        """``adapter_pages(key)``: the GPU pages a loaded adapter takes (asked once it is
        ready on the host)."""
        self.blocks = blocks
        self.slots = slots
        self.adapter_pages = adapter_pages
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.aging_steps = aging_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_front(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, adapter_ready: Callable[[str], bool]) -> SchedulerOutput:
        """Pick this step's chunks. ``adapter_ready(key)``: weights are loaded on host."""
        out = SchedulerOutput(batch=ScheduledBatch(chunks=[]), seqs=[])
        budget = self.max_num_batched_tokens
        running = self.running
        running.sort(key=_priority)
        grow = self.blocks.grow_if_fits
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            if len(seq.token_ids) >= seq.max_total:  # its last token is in flight: done
                i += 1
                continue
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            while not grow(seq, n):
                victim = running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self._add_chunk(out, seq, n)
                budget -= n
                i += 1
        if not out.preempted:  # memory is tight: admit nobody new this step
            self._admit(out, budget, adapter_ready)
        return out

    def _admit(
        self, out: SchedulerOutput, budget: int, adapter_ready: Callable[[str], bool]
    ) -> None:
        admitted: list[Sequence] = []
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.num_pending:  # preempted with a token in flight: back once it is known
                continue
            key = seq.adapter_key
            slot = -1 if key is None else self.slots.lookup(key)
            need: PageNeed = {}
            if slot is None:
                if not adapter_ready(key):  # still loading: let others pass
                    seq.waited_steps += 1
                    continue
                need = self.adapter_pages(key)
                if not self.slots.can_assign(need):  # the pages it needs are pinned
                    seq.waited_steps += 1
                    if seq.waited_steps >= self.aging_steps:
                        break
                    continue
            ok = self._fits(seq, budget)
            if not ok and not self.running and self._unfork_waiting():
                ok = self._fits(seq, budget)
            if not ok:
                seq.waited_steps += 1
                break
            if slot is None:
                slot, evicted = self.slots.assign(key, need)
                out.slot_writes.append((slot, key))
                out.evicted += evicted
            if not seq.block_table:
                self.blocks.admit(seq)
            n = min(seq.num_uncomputed, budget)
            self.blocks.grow(seq, n)
            if slot >= 0:
                self.slots.pin(slot)
            seq.slot = slot
            seq.status = SeqStatus.RUNNING
            seq.waited_steps = 0
            self.running.append(seq)
            admitted.append(seq)
            self._add_chunk(out, seq, n)
            budget -= n
        for seq in admitted:
            self.waiting.remove(seq)

    def _fits(self, seq: Sequence, budget: int) -> bool:
        if seq.block_table:  # forked from a parent: its shared blocks are in hand
            return self.blocks.can_grow(seq, min(seq.num_uncomputed, budget))
        return self.blocks.can_admit(seq, budget)

    def _unfork_waiting(self) -> bool:
        """Nothing runs and the head cannot fit: let waiting forks drop their shared blocks
        (they will recompute the prompt) so the pool can drain. True if any were held."""
        held = [s for s in self.waiting if s.block_table]
        for s in held:
            self.blocks.free(s)
        return bool(held)

    def _add_chunk(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        end = start + n
        tokens = seq.token_ids
        last = end == len(tokens)
        out.batch.chunks.append(
            SeqChunk(
                seq_id=seq.seq_id,
                token_ids=tokens[start:end],
                start_pos=start,
                block_table=seq.block_table,  # read by the runner before it grows again
                adapter_slot=seq.slot,
                sample=last and not seq.embed,
                pool=last and seq.embed,
            )
        )
        out.seqs.append(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)
        self.add_front(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq.slot >= 0:
            self.slots.unpin(seq.slot)
        seq.slot = -1

    def advance(self, out: SchedulerOutput) -> None:
        """After the runner ran ``out``: the chunks' KV is computed."""
        for seq, chunk in zip(out.seqs, out.batch.chunks, strict=True):
            if seq.status is SeqStatus.RUNNING:
                seq.num_computed_tokens = chunk.start_pos + len(chunk.token_ids)
                self.blocks.commit(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and give back its blocks and slot pin."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
