"""Cold adapter loads in worker threads; loaded weights kept in host memory (LRU by bytes).

``start(ref, owner)`` submits at most one load per key however many requests want it (the
engine calls it when a request is queued, so the load overlaps the queueing); queued loads
go to the workers round-robin over their owners (the requests' fairness keys), so one key
with a hundred cold adapters does not queue every other key's loads behind its own; the worker calls
``fetch(ref)`` (a local PEFT directory: the engine's object-store fetcher, or the
reference's own directory) then ``read_adapter(path)`` (validated, packed host weights,
pinned on a GPU engine). The step thread calls :meth:`collect` each step to take finished
loads in: successes go to the host tier, failures come back so the engine can fail that
adapter's requests. Writing weights into a GPU slot is not done here (the step thread
does it, from these host weights).

The host tier is bounded in bytes (``max_host_bytes``, and optionally a count); the least
recently used weights go first, never those a request in flight still needs. Each load is
recorded by the tier it came from (:class:`LoadStats`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.engine.api import AdapterRef, AdapterResidency
from loraplex.engine.errors import AdapterLoadError

# Where a load found the adapter's files: already on local disk (a local directory or the
# disk cache), or downloaded from the object store.
DISK, STORE = "disk", "object_store"
LOAD_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

Fetched = Path | tuple[Path, str]  # the directory, optionally with the tier it came from
Fetch = Callable[[AdapterRef], Fetched]


def local_fetch(ref: AdapterRef) -> Path:
    """The default fetch: ``ref.uri`` is a local directory (``file://`` or a plain path)."""
    if ref.storage_key is not None:
        raise AdapterLoadError(
            f"adapter {ref.key[:12]}: this engine has no object store configured", param="model"
        )
    uri = ref.uri
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def _nbytes(weights: Any) -> int:
    """Host memory held: ``host_bytes()`` where the weights say, else ``nbytes()``."""
    size = getattr(weights, "host_bytes", None) or getattr(weights, "nbytes", None)
    return int(size()) if callable(size) else 0


@dataclass
class TierLoads:
    """Loads from one source tier: a count, seconds (asked for to host-ready) as a
    histogram, the queue, fetch and read parts, and bytes of host weights made."""

    count: int = 0
    seconds: float = 0.0
    queue_seconds: float = 0.0
    fetch_seconds: float = 0.0
    read_seconds: float = 0.0
    bytes: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(LOAD_BUCKETS_S))
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=4096))  # seconds

    def add(self, queue_s: float, fetch_s: float, read_s: float, nbytes: int) -> None:
        total = queue_s + fetch_s + read_s
        self.count += 1
        self.seconds += total
        self.queue_seconds += queue_s
        self.fetch_seconds += fetch_s
        self.read_seconds += read_s
        self.bytes += nbytes
        self.recent.append(total)
        for i, edge in enumerate(LOAD_BUCKETS_S):
            if total <= edge:
                self.buckets[i] += 1  # non-cumulative; the exporter sums them up
                break


@dataclass
class LoadStats:
    by_tier: dict[str, TierLoads] = field(default_factory=dict)
    host_evictions: int = 0

    def tier(self, name: str) -> TierLoads:
        return self.by_tier.setdefault(name, TierLoads())


@dataclass(frozen=True)
class _Done:
    key: str
    weights: Any
    error: Exception | None
    tier: str = DISK
    queue_s: float = 0.0
    fetch_s: float = 0.0
    read_s: float = 0.0


class AdapterLoader:
    def __init__(
        self,
        read_adapter: Callable[[Path], Any],
        fetch: Fetch = local_fetch,
        *,
        workers: int,
        max_host_bytes: int | None = None,
        max_host_adapters: int | None = None,
        on_done: Callable[[], None] | None = None,
        in_use: Callable[[str], bool] = lambda _key: False,
        nbytes: Callable[[Any], int] = _nbytes,
        init_worker: Callable[[], None] | None = None,
    ) -> None:
        """``init_worker`` runs once in each worker thread (the engine limits its torch
        threads there, so W loads at once do not run W times all cores' threads)."""
        self._read = read_adapter
        self._fetch = fetch
        self._max_bytes = max_host_bytes
        self._max_count = max_host_adapters
        self._nbytes = nbytes
        self.on_done = on_done  # called from a worker thread when a load ends
        # Keys that requests in flight still need are never evicted: evicting one that a
        # waiting request is about to use only makes it load again (a thrash under load).
        self._in_use = in_use
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="adapter-load", initializer=init_worker
        )
        self._lock = threading.Lock()
        self._done: list[_Done] = []  # guarded by _lock
        # owner -> its loads not yet taken by a worker, owners in round-robin order (_lock)
        self._queued: OrderedDict[str, deque[tuple[AdapterRef, float]]] = OrderedDict()
        self._loading: set[str] = set()  # step thread only, like everything below
        self._host: OrderedDict[str, tuple[Any, int]] = OrderedDict()  # key -> (weights, bytes)
        self.host_bytes = 0
        self.loads = 0
        self.failures = 0
        self.stats = LoadStats()

    @property
    def max_host_bytes(self) -> int | None:
        return self._max_bytes

    def is_ready(self, key: str) -> bool:
        return key in self._host

    @property
    def num_loading(self) -> int:
        return len(self._loading)

    @property
    def num_host(self) -> int:
        return len(self._host)

    def is_loading(self, key: str) -> bool:
        return key in self._loading

    def start(self, ref: AdapterRef, owner: str = "") -> bool:
        """Begin loading unless loaded or loading already. True when a load started."""
        if ref.key in self._host or ref.key in self._loading:
            return False
        self._loading.add(ref.key)
        with self._lock:
            self._queued.setdefault(owner, deque()).append((ref, time.perf_counter()))
        self._pool.submit(self._load_next)
        return True

    def _load_next(self) -> None:
        """A worker takes the next queued load, round-robin over owners."""
        with self._lock:
            owner, loads = next(iter(self._queued.items()))
            ref, asked = loads.popleft()
            del self._queued[owner]
            if loads:
                self._queued[owner] = loads  # to the back of the round
        self._load(ref, asked)

    def _load(self, ref: AdapterRef, asked: float) -> None:
        t0 = time.perf_counter()
        tier, fetch_s = DISK, 0.0
        try:
            got = self._fetch(ref)
            path, tier = got if isinstance(got, tuple) else (got, DISK)
            t1 = time.perf_counter()
            fetch_s = t1 - t0
            weights = self._read(Path(path))
        except Exception as exc:
            done = _Done(ref.key, None, exc, tier, t0 - asked, fetch_s)
        else:
            read_s = time.perf_counter() - t1
            done = _Done(ref.key, weights, None, tier, t0 - asked, fetch_s, read_s)
        with self._lock:
            self._done.append(done)
        if self.on_done is not None:
            self.on_done()

    def has_finished(self) -> bool:
        with self._lock:
            return bool(self._done)

    def collect(self) -> list[tuple[str, Exception]]:
        """Take finished loads in; return the failures as ``(key, error)``."""
        with self._lock:
            done, self._done = self._done, []
        failed = []
        for d in done:
            self._loading.discard(d.key)
            if d.error is not None:
                self.failures += 1
                failed.append((d.key, d.error))
                continue
            self.loads += 1
            size = self._nbytes(d.weights)
            data = getattr(d.weights, "nbytes", None)  # the bytes loaded (not their rounding)
            loaded = int(data()) if callable(data) else size
            self.stats.tier(d.tier).add(d.queue_s, d.fetch_s, d.read_s, loaded)
            old = self._host.pop(d.key, None)
            if old is not None:
                self.host_bytes -= old[1]
            self._host[d.key] = (d.weights, size)
            self.host_bytes += size
        self._evict()
        return failed

    def _over(self) -> bool:
        return (self._max_count is not None and len(self._host) > self._max_count) or (
            self._max_bytes is not None and self.host_bytes > self._max_bytes
        )

    def _evict(self) -> None:
        """Drop least recently used weights while over a bound, skipping keys still in use
        (so a bound can be exceeded by at most the adapters of requests in flight)."""
        if not self._over():
            return
        for key in [k for k in self._host if not self._in_use(k)]:
            _, size = self._host.pop(key)
            self.host_bytes -= size
            self.stats.host_evictions += 1
            if not self._over():
                return

    def get(self, key: str) -> Any:
        self._host.move_to_end(key)
        return self._host[key][0]

    def drop(self, key: str) -> bool:
        """Forget ``key``'s host weights. True when they were held."""
        held = self._host.pop(key, None)
        if held is not None:
            self.host_bytes -= held[1]
        return held is not None

    def residency(self, gpu: list[str]) -> AdapterResidency:
        return AdapterResidency(gpu=list(gpu), host=list(self._host), loading=list(self._loading))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
