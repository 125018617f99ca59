"""The scheduler's waiting sequences: one first-come-first-served queue per priority tier and
fairness key, read in fair order (``engine/fairness.py``) by the admission loop. No torch.

``in_fair_order`` merges the keys' queues lazily with a heap of each key's next sequence:
ordered by priority tier, then by the key's virtual counter plus the estimated service of
the sequences ahead of it in its own queue (their prompt at the prefill cost), then by the
key's queue length (a key just lifted to the least-served counter goes before a backlog),
then by arrival; only the sequences the loop looks at cost anything.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator

from loraplex.engine.fairness import FairShare
from loraplex.engine.sequence import Sequence


class WaitQueue:
    def __init__(self) -> None:
        self._q: dict[tuple[int, str], deque[Sequence]] = {}  # (tier, fair key) -> queue
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __iter__(self) -> Iterator[Sequence]:
        """Every waiting sequence (no copy: do not add or remove while iterating)."""
        for q in self._q.values():
            yield from q

    def __getitem__(self, i: int) -> Sequence:
        """The ``i``-th in iteration order (keys in first-seen order; tests and tools)."""
        return list(self)[i]

    def __contains__(self, seq: Sequence) -> bool:
        q = self._q.get((seq.priority_tier, seq.fair_key))
        return q is not None and seq in q

    def append(self, seq: Sequence) -> None:
        self._q.setdefault((seq.priority_tier, seq.fair_key), deque()).append(seq)
        self._n += 1

    def appendleft(self, seq: Sequence) -> None:
        self._q.setdefault((seq.priority_tier, seq.fair_key), deque()).appendleft(seq)
        self._n += 1

    def remove(self, seq: Sequence) -> None:
        where = (seq.priority_tier, seq.fair_key)
        q = self._q[where]
        q.remove(seq)
        self._n -= 1
        if not q:
            del self._q[where]

    def heads(self) -> Iterator[tuple[Sequence, int]]:
        """(first sequence, queue length) of each (tier, key) queue."""
        for q in self._q.values():
            yield q[0], len(q)

    def in_fair_order(self, fair: FairShare) -> Iterator[Sequence]:
        """Every waiting sequence, fairest first (see the module docstring). With one key and
        tier, its queue as it stands. Do not add or remove while iterating."""
        if len(self._q) == 1:
            (q,) = self._q.values()
            yield from q
            return
        # ties (a key just lifted to the least-served one's counter) go to the shorter queue
        heap: list[tuple[int, float, int, int, int, str]] = []
        for (tier, key), q in self._q.items():
            entry = (tier, fair.counter(key), len(q), q[0].arrival, 0, key)
            heapq.heappush(heap, entry)
        while heap:
            tier, vt, n, _, i, key = heapq.heappop(heap)
            q = self._q[(tier, key)]
            seq = q[i]
            yield seq
            if i + 1 < len(q):
                nxt = q[i + 1]
                vt += fair.cost(key, seq.num_uncomputed, 0)
                heapq.heappush(heap, (tier, vt, n, nxt.arrival, i + 1, key))
