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

With more than one fairness key active (``engine/fairness.py``) the order is fair instead:
waiting sequences by priority tier and least service received; running ones likewise;
when KV blocks run out, the newest sequence of the key most past its share of the pool is
preempted (else the most-served key's newest); a key below its weighted share of the batch
(or of the pool, when that is what is full), or clearly less served, may preempt one of a
key above its share to get in (a few per step); a cold
adapter does not evict one that another key's waiting sequences need; an aged
sequence holds back only its own key; and while a key leaves part of its share of the
batch unused, a key holding more than its own share gets at most
``contended_prefill_tokens`` of prefill a step past that share, so that the steps stay short
for the key whose seats it borrows (its next first token waits on the steps in flight).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter

from loraplex.engine.batch import ScheduledBatch, SeqChunk
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.fairness import FairShare
from loraplex.engine.lora.slots import PageNeed, SlotTable
from loraplex.engine.sequence import SeqStatus, Sequence
from loraplex.engine.wait_queue import WaitQueue

_priority = attrgetter("arrival", "index")  # = Sequence.priority, read in C
_fair_key_of = attrgetter("fair_key")
MAX_FAIR_PREEMPTIONS = 4  # per step: sequences preempted to let a key under its share in


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
        contended_prefill_tokens: int | None = None,
        adapter_pages: Callable[[str], PageNeed] = lambda key: {},
    ) -> None:
        """``adapter_pages(key)``: the GPU pages a loaded adapter takes (asked once it is
        ready on the host). ``contended_prefill_tokens``: the prefill a step gives the keys
        past their share while another key leaves part of its own unused (None: no bound)."""
        self.blocks = blocks
        self.slots = slots
        self.adapter_pages = adapter_pages
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.aging_steps = aging_steps
        self.contended_prefill_tokens = contended_prefill_tokens
        self.waiting = WaitQueue()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.fair = FairShare()
        self.steps = 0
        self._fair_preempted = 0
        self._deferred: list[Sequence] = []  # fair preemptions, queued again after admission
        self._tiers: dict[int, int] = {}  # priority tier -> its sequences waiting or running
        self._bounded_left = 0  # this step's prefill left to keys above their share

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self._enter(seq)
        self.waiting.append(seq)

    def add_front(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self._enter(seq)
        self.waiting.appendleft(seq)

    @property
    def _fair(self) -> bool:
        """More than one key or priority tier active: the fair order applies."""
        return self.fair.num_active > 1 or len(self._tiers) > 1

    def _enter(self, seq: Sequence) -> None:
        if not seq.fair_counted:
            seq.fair_counted = True
            self.fair.enter(seq.fair_key, seq.fair_weight)
            t = seq.priority_tier
            self._tiers[t] = self._tiers.get(t, 0) + 1
        if seq.queued_step < 0:
            seq.queued_step = self.steps
            if not seq.queued_at:  # (the engine sets when it received the request)
                seq.queued_at = time.perf_counter()

    def _fair_order(self, seq: Sequence) -> tuple[int, float, int, int]:
        return (seq.priority_tier, self.fair.counter(seq.fair_key), seq.arrival, seq.index)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, adapter_ready: Callable[[str], bool]) -> SchedulerOutput:
        """Pick this step's chunks. ``adapter_ready(key)``: weights are loaded on host."""
        out = SchedulerOutput(batch=ScheduledBatch(chunks=[]), seqs=[])
        self.steps += 1
        budget = self.max_num_batched_tokens
        running = self.running
        if self._fair:  # = self._fair_order, its lookups inlined (a call per sequence a step)
            ctr = self.fair.counters
            running.sort(
                key=lambda s: (s.priority_tier, ctr.get(s.fair_key, 0.0), s.arrival, s.index)
            )
        else:
            running.sort(key=_priority)
        grow = self.blocks.grow_if_fits
        fair = self._fair
        seats = self._seats_if_bounded()
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            if len(seq.token_ids) >= seq.max_total:  # its last token is in flight: done
                i += 1
                continue
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            # a prompt's chunk (or a recompute) of a key over its share
            capped = n > 1 and seats is not None and self._over(seq.fair_key, seats, 0)
            if capped:
                n = min(n, self._bounded_left)
                if n <= 0:
                    i += 1
                    continue
            while not grow(seq, n):
                victim = self._kv_victim() if fair else running[-1]
                if running.index(victim) < i:  # scheduled already this step
                    budget += self._unschedule(victim, out)
                    i -= 1
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self._add_chunk(out, seq, n)
                budget -= n
                if capped:
                    self._bounded_left -= n
                i += 1
        if not out.preempted:  # memory is tight: admit nobody new this step
            self._fair_preempted = 0
            self._admit(out, budget, adapter_ready, seats)
        return out

    def _kv_victim(self) -> Sequence:
        """KV blocks ran out (fair order): the running sequence to preempt. The lowest tier
        running gives way first; within it, the newest sequence of the key holding the most
        blocks past its weighted share of the pool, so one key's long contexts cannot keep
        the others out; when no key is past its share, the last in the fair order (the
        most-served key's newest)."""
        running = self.running
        tier = max(s.priority_tier for s in running)
        lowest = [s for s in running if s.priority_tier == tier]
        key = self._most_past_kv_share(lowest)
        if key is None:
            return running[-1]
        return max((s for s in lowest if s.fair_key == key), key=_priority)

    def _most_past_kv_share(
        self, seqs: list[Sequence], exclude: str | None = None, need: int = 0
    ) -> str | None:
        """The key (not ``exclude``) whose sequences among ``seqs`` hold the most KV blocks
        past its weighted share of the pool, if one does; None also when ``exclude`` itself,
        with ``need`` blocks more, would be past its own share."""
        held: Counter[str] = Counter()
        blocks_of = self.blocks.held
        for s in seqs:
            held[s.fair_key] += blocks_of(s)
        pool, share = self.blocks.num_blocks, self.fair.share
        if exclude is not None and held[exclude] + need > share(exclude) * pool:
            return None
        past = [(n - share(k) * pool, k) for k, n in held.items() if k != exclude]
        excess, key = max(past, default=(0.0, ""))
        return key if excess > 0 else None

    def _seats_if_bounded(self) -> Counter[str] | None:
        """With the fair order on, ``contended_prefill_tokens`` below the step's budget and
        a key lending seats (all it has running and waiting fits in its weighted share of
        the batch: its next request should not wait on long steps): the running sequences
        per key (a key's prefill past its share is bounded this step; what is left of the
        bound is kept in ``_bounded_left``). Keys that are all backlogged lend nothing, and
        their steps are not bounded."""
        cap = self.contended_prefill_tokens
        if cap is None or cap >= self.max_num_batched_tokens or not self._fair:
            return None
        seated = Counter(map(_fair_key_of, self.running))
        demand = seated.copy()
        for head, n in self.waiting.heads():
            demand[head.fair_key] += n
        seats, share = self.max_num_seqs, self.fair.share
        if all(n >= share(k) * seats for k, n in demand.items()):
            return None
        self._bounded_left = cap
        return seated

    def _over(self, key: str, seats: Counter[str], more: int) -> bool:
        """Whether ``key`` with ``more`` sequences seated besides its running ones holds
        more than its weighted share of the batch."""
        return seats[key] + more > self.fair.share(key) * self.max_num_seqs

    def _admit(
        self,
        out: SchedulerOutput,
        budget: int,
        adapter_ready: Callable[[str], bool],
        seats: Counter[str] | None = None,
    ) -> None:
        """``seats``: running sequences per key when keys over their share have their
        prefill bounded this step (``_seats_if_bounded``), else None."""
        fair = self._fair
        admitted: list[Sequence] = []
        held_back: set[str] = set()  # fair: keys whose aged head holds the rest of the key
        no_room = 0  # fair: sequences that found the batch full and could not make room
        demand: dict[str, set[str]] | None = None  # fair: adapter key -> waiting fair keys
        # seats are kept for keys below their share only when not every waiting one fits
        contended = fair and self.max_num_seqs - len(self.running) < len(self.waiting)
        seated, reserved, tiers = self._reservations() if contended else ({}, {}, {})
        for seq in self.waiting.in_fair_order(self.fair):
            if budget <= 0 or (len(self.running) >= self.max_num_seqs and not fair):
                break
            if seq.num_pending:  # preempted with a token in flight: back once it is known
                continue
            if seq.fair_key in held_back:
                continue
            capped = seats is not None and self._over(seq.fair_key, seats, 1)
            if capped and self._bounded_left <= 0:
                continue  # this step's prefill for keys above their share is spent
            if reserved and self._seat_reserved(seq, seated, reserved, tiers):
                continue
            key = seq.adapter_key
            slot = -1 if key is None else self.slots.lookup(key)
            need: PageNeed = {}
            if slot is None:
                if not adapter_ready(key):  # still loading: let others pass
                    seq.waited_steps += 1
                    continue
                need = self.adapter_pages(key)
                if fair and demand is None:
                    demand = self._adapter_demand()
                guard = self._guard(demand, key, seq.fair_key) if fair and demand else []
                can = self.slots.can_assign(need)
                while not can and fair and self._fair_preempted < MAX_FAIR_PREEMPTIONS:
                    before = self._fair_preempted  # adapter memory pinned: room if below share
                    budget = self._make_room(seq, out, budget)
                    if self._fair_preempted == before:
                        break
                    can = self.slots.can_assign(need)
                if not can:  # the pages it needs are pinned (or another key's queue needs them)
                    self._unguard(guard)
                    seq.waited_steps += 1
                    if seq.waited_steps >= self.aging_steps:
                        if not fair:
                            break
                        held_back.add(seq.fair_key)
                    continue
            else:
                guard = []
            if len(self.running) >= self.max_num_seqs:  # fair: room if below its share
                budget = self._make_room(seq, out, budget)
                if len(self.running) >= self.max_num_seqs or budget <= 0:
                    self._unguard(guard)
                    no_room += 1
                    if no_room >= MAX_FAIR_PREEMPTIONS or budget <= 0:
                        break
                    continue  # another key may be below its share
            ok = self._fits(seq, budget)
            if not ok and not self.running and self._unfork_waiting():
                ok = self._fits(seq, budget)
            if not ok and fair:
                budget = self._make_room(seq, out, budget)
                ok = self._fits(seq, budget)
            if not ok:
                self._unguard(guard)
                seq.waited_steps += 1
                break
            if slot is None:
                slot, evicted = self.slots.assign(key, need)
                out.slot_writes.append((slot, key))
                out.evicted += evicted
            self._unguard(guard)
            if not seq.block_table:
                self.blocks.admit(seq)
            n = min(seq.num_uncomputed, budget)
            if capped and n > 1:
                n = min(n, self._bounded_left)
                self._bounded_left -= n
            if seats is not None:
                seats[seq.fair_key] += 1
            self.blocks.grow(seq, n)
            if slot >= 0:
                self.slots.pin(slot)
            seq.slot = slot
            seq.status = SeqStatus.RUNNING
            seq.waited_steps = 0
            if not seq.started:
                seq.started = True
                self.fair.queued(
                    seq.fair_key, time.perf_counter() - seq.queued_at, self.steps - seq.queued_step
                )
            self.running.append(seq)
            admitted.append(seq)
            self._add_chunk(out, seq, n)
            budget -= n
            if reserved:
                k = seq.fair_key
                seated[k] = seated.get(k, 0) + 1
                if reserved.get(k, 0) > 0:
                    reserved[k] -= 1
        for seq in admitted:
            self.waiting.remove(seq)
        for seq in self._deferred:  # preempted for fairness: queued again after the loop
            self.add_front(seq)
        self._deferred.clear()

    # -- fairness (more than one key active) ------------------------------------------------

    def _reservations(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """-> (running sequences per key, seats reserved per key, the reserving keys' best
        tier): a waiting key below its weighted share of the batch reserves the seats it
        lacks, up to its queue's length (not while its head is held up, e.g. by an adapter
        load: the seat would sit empty)."""
        seated: dict[str, int] = Counter(map(_fair_key_of, self.running))
        reserved: dict[str, int] = {}
        tiers: dict[str, int] = {}
        seats, fair = self.max_num_seqs, self.fair
        for head, n in self.waiting.heads():
            k = head.fair_key
            if head.waited_steps or head.num_pending:
                continue
            lack = int(fair.share(k) * seats) - seated.get(k, 0)
            if lack > 0:
                reserved[k] = reserved.get(k, 0) + min(lack, n)
                tiers[k] = min(tiers.get(k, head.priority_tier), head.priority_tier)
        return seated, reserved, tiers

    def _seat_reserved(
        self, seq: Sequence, seated: dict[str, int], reserved: dict[str, int], tiers: dict[str, int]
    ) -> bool:
        """Whether ``seq`` must leave the batch's free seats to keys below their share (of
        its tier or a higher one): its own key would go past its share while the free seats
        are no more than the others' reservations. Without this, a backlogged key at its
        share takes a freed seat and the key below its share preempts that sequence at once
        (its prefill recomputed later)."""
        k = seq.fair_key
        if seated.get(k, 0) + 1 <= self.fair.share(k) * self.max_num_seqs:
            return False
        t = seq.priority_tier
        others = sum(v for key, v in reserved.items() if key != k and tiers[key] <= t)
        return others > 0 and self.max_num_seqs - len(self.running) <= others

    def _make_room(self, seq: Sequence, out: SchedulerOutput, budget: int) -> int:
        """Preempt for ``seq`` a running sequence of a lower tier if there is one, else the
        newest sequence of the most-served key above its share of the batch, when ``seq``'s
        key is below its own share or has received clearly less (by more than a step's
        tokens). -> the token budget after."""
        if self._fair_preempted >= MAX_FAIR_PREEMPTIONS:
            return budget
        running = self.running
        if len(self._tiers) > 1:  # (one tier active: nobody runs in a lower one)
            lower = [r for r in running if r.priority_tier > seq.priority_tier]
            if lower:  # a lower tier gives way first, whatever its key
                return self._take_back(max(lower, key=self._fair_order), out, budget)
        # counted in C: when the batch is full this runs for several waiting sequences a step
        seated = Counter(map(_fair_key_of, running))
        seats, fair = self.max_num_seqs, self.fair
        over = [
            (fair.counter(k), k)
            for k, n in seated.items()
            if k != seq.fair_key and n > fair.share(k) * seats
        ]
        if not over:
            return self._make_kv_room(seq, out, budget)
        top, victim_key = max(over)
        below_share = seated.get(seq.fair_key, 0) + 1 <= fair.share(seq.fair_key) * seats
        owed = fair.counter(seq.fair_key) + self.max_num_batched_tokens < top
        if not (below_share or owed):
            return budget
        victims = [r for r in running if r.fair_key == victim_key]
        return self._take_back(max(victims, key=self._fair_order), out, budget)

    def _make_kv_room(self, seq: Sequence, out: SchedulerOutput, budget: int) -> int:
        """No key is past its share of seats: preempt for ``seq`` the newest sequence of the
        key holding the most KV blocks past its weighted share of the pool, if ``seq``'s key
        (with what ``seq`` needs) stays within its own. -> the token budget after."""
        need = -(-seq.num_uncomputed // self.blocks.block_size)
        key = self._most_past_kv_share(self.running, seq.fair_key, need)
        if key is None:
            return budget
        victims = [r for r in self.running if r.fair_key == key]
        return self._take_back(max(victims, key=self._fair_order), out, budget)

    def _take_back(self, victim: Sequence, out: SchedulerOutput, budget: int) -> int:
        """Preempt ``victim`` for fairness (queued again after admission)."""
        if victim in out.seqs:  # it has a chunk in this step
            budget += self._unschedule(victim, out)
        self._preempt(victim, out, requeue=False)
        self._deferred.append(victim)
        self._fair_preempted += 1
        return budget

    @staticmethod
    def _unschedule(seq: Sequence, out: SchedulerOutput) -> int:
        """Take ``seq``'s chunk back out of this step. -> its tokens (budget given back)."""
        i = out.seqs.index(seq)
        n = len(out.batch.chunks[i].token_ids)
        del out.seqs[i], out.batch.chunks[i]
        return n

    def _adapter_demand(self) -> dict[str, set[str]]:
        """Adapters resident on GPU, not pinned, that waiting sequences need: by fair key."""
        demand: dict[str, set[str]] = {}
        for w in self.waiting:
            a = w.adapter_key
            if a is not None:
                slot = self.slots.lookup(a)
                if slot is not None and not self.slots.is_pinned(slot):
                    demand.setdefault(a, set()).add(w.fair_key)
        return demand

    def _guard(self, demand: dict[str, set[str]], key: str, fair_key: str) -> list[int]:
        """Pin, for one assignment, the adapters other keys' waiting sequences need."""
        guard = []
        for a, keys in demand.items():
            if a != key and keys - {fair_key}:
                slot = self.slots.lookup(a)
                if slot is not None:
                    self.slots.pin(slot)
                    guard.append(slot)
        return guard

    def _unguard(self, guard: list[int]) -> None:
        for slot in guard:
            self.slots.unpin(slot)
        guard.clear()

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
                local_tables=seq.local_tables,
                local_start=seq.local_start,
                adapter_slot=seq.slot,
                sample=last and not seq.embed,
                pool=last and seq.embed,
            )
        )
        out.seqs.append(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput, requeue: bool = True) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.num_preemptions += 1
        self.fair.preempted(seq.fair_key)
        out.preempted.append(seq)
        if requeue:
            self.add_front(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq.slot >= 0:
            self.slots.unpin(seq.slot)
        seq.slot = -1

    def advance(self, out: SchedulerOutput) -> None:
        """After the runner ran ``out``: the chunks' KV is computed (and charged to the
        chunks' fairness keys: one charge per key and step)."""
        acc: dict[str, list[int]] = {}
        for seq, chunk in zip(out.seqs, out.batch.chunks, strict=True):
            if seq.status is SeqStatus.RUNNING:
                start = chunk.start_pos
                end = seq.num_computed_tokens = start + len(chunk.token_ids)
                self.blocks.commit(seq)
                prefill = max(0, min(end, seq.prompt_len) - start)
                a = acc.get(seq.fair_key)
                if a is None:
                    acc[seq.fair_key] = [prefill, end - start - prefill]
                else:
                    a[0] += prefill
                    a[1] += end - start - prefill
        for key, (prefill, decode) in acc.items():
            self.fair.charge(key, prefill, decode)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and give back its blocks and slot pin."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        if seq.fair_counted:
            seq.fair_counted = False
            self.fair.leave(seq.fair_key)
            t = seq.priority_tier
            if self._tiers[t] > 1:
                self._tiers[t] -= 1
            else:
                del self._tiers[t]
