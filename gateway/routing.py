"""Which engine replica takes a request: adapter affinity with bounded load. Pure policy.

Each replica is seen as a :class:`ReplicaView` (plain values: its name, the requests this
gateway process has in flight on it, the adapter keys it reported in GPU slots). For a
request with adapter ``k``:

1. the replicas that hold ``k`` on GPU and are under the load bound: the least loaded of
   them (ties: ``k``'s hash order below);
2. else the first replica under the bound in ``k``'s rendezvous-hash order (highest random
   weight): ``k``'s *home*, the same in every gateway process with no coordination, and
   moving only the keys of a replica that comes or goes;
3. a request with no adapter goes to the least loaded replica.

The bound is consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam):
no replica takes a request that would put it over ``ceil(factor * (in flight + 1) / n)``,
so a hot adapter spills to its next replica instead of queueing on one; but never below
``floor``: an engine batches that many requests at once anyway, and at low load the
formula's rounding would spill (an adapter load on the other replica) for nothing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Outcome = Literal["resident", "home", "spill", "base"]


@dataclass(frozen=True)
class ReplicaView:
    name: str
    inflight: int = 0
    gpu: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Choice:
    name: str
    # resident: a replica holding the adapter on GPU; home: its hash home (not holding it
    # yet); spill: a later replica in its hash order (home and holders over the bound);
    # base: no adapter
    outcome: Outcome


def _weight(key: str, name: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def hash_order(key: str, names: Sequence[str]) -> list[str]:
    """``names`` in ``key``'s rendezvous order (its home first)."""
    return sorted(names, key=lambda n: _weight(key, n), reverse=True)


def load_bound(replicas: Sequence[ReplicaView], factor: float, floor: int = 1) -> int:
    """The most requests in flight a replica may have after taking one more."""
    total = sum(r.inflight for r in replicas) + 1
    return max(1, floor, math.ceil(factor * total / len(replicas)))


def choose(
    adapter: str | None, replicas: Sequence[ReplicaView], factor: float, floor: int = 1
) -> Choice | None:
    """The replica for a request (None when ``replicas`` is empty)."""
    if not replicas:
        return None
    if adapter is None:
        return Choice(min(replicas, key=lambda r: (r.inflight, r.name)).name, "base")
    bound = load_bound(replicas, factor, floor)
    order = hash_order(adapter, [r.name for r in replicas])
    rank = {name: i for i, name in enumerate(order)}
    by_name = {r.name: r for r in replicas}
    holders = [r for r in replicas if adapter in r.gpu and r.inflight < bound]
    if holders:
        best = min(holders, key=lambda r: (r.inflight, rank[r.name]))
        return Choice(best.name, "resident")
    for i, name in enumerate(order):
        if by_name[name].inflight < bound:
            return Choice(name, "home" if i == 0 else "spill")
    # unreachable with factor >= 1 (the least loaded is under the mean); kept total
    return Choice(min(replicas, key=lambda r: (r.inflight, rank[r.name])).name, "spill")
