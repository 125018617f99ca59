"""Who is served next when several fairness keys compete: weighted virtual token counters.

The engine knows nothing of tenants: a request carries an opaque ``fairness_key`` (the
gateway puts the tenant there), a ``fairness_weight`` and a ``priority`` tier (lower first).
Each key has a virtual counter of the service it received, in weighted tokens
(``PREFILL_COST`` per prompt token, ``DECODE_COST`` per generated one, divided by its
weight), as in VTC ("Fairness in Serving Large Language Models", OSDI 2024):

- the waiting queue is served lowest counter first (within a priority tier; within a key,
  first come first served), so a key that has received less goes ahead;
- a key that becomes active is lifted to the smallest counter among the active keys (no
  credit banked while idle), or to the highest counter seen when nobody is active (after an
  idle period nobody has credit or debt);
- work conserving: an idle key's share goes to whoever is waiting;
- preemption takes from the lowest tier and the most-served key first.

With one key active nothing here changes the order (the scheduler's fast path).
Per-key statistics are kept for at most ``MAX_KEYS_REPORTED`` keys (later keys are summed
under ``OTHER``), so metric labels stay bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFILL_COST = 1.0
DECODE_COST = 2.0  # a generated token costs about twice a prompt token (VTC's weights)
MAX_KEYS_REPORTED = 64
OTHER = "other"
NO_KEY = ""  # requests without a key share one


@dataclass
class KeyStats:
    """What one key received (reported under bounded labels)."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    queue_seconds: float = 0.0  # summed over sequences, arrival to first scheduled
    queue_steps: int = 0  # the same in scheduler steps
    queued: int = 0  # sequences that were scheduled for the first time
    preemptions: int = 0
    first_token_seconds: float = 0.0  # summed over requests: in the engine to first token
    first_token_steps: int = 0  # the same in scheduler steps
    first_tokens: int = 0


class FairShare:
    def __init__(self) -> None:
        self._counter: dict[str, float] = {}
        self._weight: dict[str, float] = {}
        self._active: dict[str, int] = {}  # key -> its sequences waiting or running
        self._active_weight = 0.0  # the active keys' weights summed (share() per call is O(1))
        self._high = 0.0  # the highest counter seen
        self.stats: dict[str, KeyStats] = {}

    # -- membership ----------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        return len(self._active)

    def enter(self, key: str, weight: float) -> None:
        """A sequence of ``key`` is queued."""
        n = self._active.get(key, 0)
        self._weight[key] = weight
        if n == 0:
            own = self._counter.get(key, 0.0)
            floor = min((self._counter[k] for k in self._active), default=self._high)
            self._counter[key] = max(own, floor)
        self._active[key] = n + 1
        self._sum_weights()

    def leave(self, key: str) -> None:
        """A sequence of ``key`` finished (or was dropped)."""
        n = self._active.get(key, 0) - 1
        if n > 0:
            self._active[key] = n
        else:
            self._active.pop(key, None)
            self._sum_weights()

    def _sum_weights(self) -> None:
        self._active_weight = sum(self._weight.get(k, 1.0) for k in self._active)

    # -- service -------------------------------------------------------------------------

    def counter(self, key: str) -> float:
        return self._counter.get(key, 0.0)

    @property
    def counters(self) -> dict[str, float]:
        """Every key's counter (read only: for sort keys that look many up a step)."""
        return self._counter

    def weight(self, key: str) -> float:
        return self._weight.get(key, 1.0)

    def cost(self, key: str, prefill: int, decode: int) -> float:
        return (prefill * PREFILL_COST + decode * DECODE_COST) / self.weight(key)

    def charge(self, key: str, prefill: int, decode: int) -> None:
        c = self._counter.get(key, 0.0) + self.cost(key, prefill, decode)
        self._counter[key] = c
        if c > self._high:
            self._high = c
        s = self._stats(key)
        s.prefill_tokens += prefill
        s.decode_tokens += decode

    def share(self, key: str) -> float:
        """``key``'s weighted share among the active keys (1.0 when alone)."""
        total = self._active_weight
        return self._weight.get(key, 1.0) / total if total else 1.0

    # -- statistics ----------------------------------------------------------------------

    def _stats(self, key: str) -> KeyStats:
        s = self.stats.get(key)
        if s is None:
            if len(self.stats) >= MAX_KEYS_REPORTED:
                key = OTHER
            s = self.stats.setdefault(key, KeyStats())
        return s

    def queued(self, key: str, seconds: float, steps: int) -> None:
        s = self._stats(key)
        s.queue_seconds += seconds
        s.queue_steps += steps
        s.queued += 1

    def preempted(self, key: str) -> None:
        self._stats(key).preemptions += 1

    def first_token(self, key: str, seconds: float, steps: int) -> None:
        """A request of ``key`` has its first token on the host, ``seconds`` (and ``steps``
        scheduler steps) after it reached the engine."""
        s = self._stats(key)
        s.first_token_seconds += seconds
        s.first_token_steps += steps
        s.first_tokens += 1
