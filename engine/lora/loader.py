"""Cold adapter loads in worker threads; loaded weights kept in host memory (LRU).

``start(ref)`` submits at most one load per key however many requests want it; the
worker calls ``fetch(ref)`` (a local PEFT directory: the engine's object-store fetcher, or
the reference's own directory) then ``read_adapter(path)`` (validated CPU weights). The
step thread calls :meth:`collect` each step to take finished loads in: successes go to
the host cache, failures come back so the engine can fail that adapter's requests.
Writing weights into a GPU slot is not done here (the step thread does it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.api import AdapterRef, AdapterResidency
from engine.errors import AdapterLoadError


def local_fetch(ref: AdapterRef) -> Path:
    """The default fetch: ``ref.uri`` is a local directory (``file://`` or a plain path)."""
    if ref.storage_key is not None:
        raise AdapterLoadError(
            f"adapter {ref.key[:12]}: this engine has no object store configured", param="model"
        )
    uri = ref.uri
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


class AdapterLoader:
    def __init__(
        self,
        read_adapter: Callable[[Path], Any],
        fetch: Callable[[AdapterRef], Path] = local_fetch,
        *,
        max_host_adapters: int,
        workers: int,
        on_done: Callable[[], None] | None = None,
        in_use: Callable[[str], bool] = lambda _key: False,
    ) -> None:
        self._read = read_adapter
        self._fetch = fetch
        self._max_host = max_host_adapters
        self.on_done = on_done  # called from a worker thread when a load ends
        # Keys that requests in flight still need are never evicted: evicting one that a
        # waiting request is about to use only makes it load again (a thrash under load).
        self._in_use = in_use
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load")
        self._lock = threading.Lock()
        self._done: list[tuple[str, Any, Exception | None]] = []  # guarded by _lock
        self._loading: set[str] = set()  # step thread only, like everything below
        self._host: OrderedDict[str, Any] = OrderedDict()
        self.loads = 0
        self.failures = 0

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

    def start(self, ref: AdapterRef) -> bool:
        """Begin loading unless loaded or loading already. True when a load started."""
        if ref.key in self._host or ref.key in self._loading:
            return False
        self._loading.add(ref.key)
        self._pool.submit(self._load, ref)
        return True

    def _load(self, ref: AdapterRef) -> None:
        try:
            weights = self._read(Path(self._fetch(ref)))
        except Exception as exc:
            result: tuple[str, Any, Exception | None] = (ref.key, None, exc)
        else:
            result = (ref.key, weights, None)
        with self._lock:
            self._done.append(result)
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
        for key, weights, err in done:
            self._loading.discard(key)
            if err is not None:
                self.failures += 1
                failed.append((key, err))
                continue
            self.loads += 1
            self._host[key] = weights
            self._host.move_to_end(key)
        self._evict()
        return failed

    def _evict(self) -> None:
        """Drop least recently used weights over the bound, skipping keys still in use
        (so the bound can be exceeded by at most the adapters of requests in flight)."""
        excess = len(self._host) - self._max_host
        if excess <= 0:
            return
        for key in [k for k in self._host if not self._in_use(k)][:excess]:
            del self._host[key]

    def get(self, key: str) -> Any:
        self._host.move_to_end(key)
        return self._host[key]

    def drop(self, key: str) -> bool:
        """Forget ``key``'s host weights. True when they were held."""
        return self._host.pop(key, None) is not None

    def residency(self, gpu: list[str]) -> AdapterResidency:
        return AdapterResidency(gpu=list(gpu), host=list(self._host), loading=list(self._loading))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
