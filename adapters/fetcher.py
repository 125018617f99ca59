"""The engine side's fetcher: a content key and an object key -> a local adapter directory.

``fetch`` runs in an engine loader thread: disk cache hit, else one download from the
object store per cold adapter however many threads ask at once (the others wait for it).
A failed download raises :class:`AdapterFetchError` (the engine answers 503 for that
adapter's requests). A store that is down is not hammered: the app's store sits behind a
circuit breaker (:mod:`adapters.guarded_store`) that fails cold fetches at once while it
is open and lets one through as soon as it may probe, so fetches work again within
``open_s`` of the store coming back. A missing or corrupt object backs off per adapter
(doubling, capped), since fetching it again soon would fail the same way.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from loraplex.adapters.bundle import sha256_file, unpack
from loraplex.adapters.cache import TIER as DISK_TIER
from loraplex.adapters.cache import DiskCache
from loraplex.adapters.errors import AdapterFetchError, InvalidAdapter
from loraplex.adapters.metrics import AdapterMetrics
from loraplex.adapters.storage import ObjectMissing, ObjectStore, StoreError

TIER = "object_store"
log = logging.getLogger("loraplex.adapters")


class Backoff:
    def __init__(self, initial: float, maximum: float, clock: Callable[[], float]) -> None:
        self.initial, self.maximum, self.clock = initial, maximum, clock
        self.delay = 0.0
        self.until = 0.0

    def wait_left(self) -> float:
        return max(0.0, self.until - self.clock())

    def failed(self) -> None:
        self.delay = min(self.maximum, self.delay * 2 if self.delay else self.initial)
        self.until = self.clock() + self.delay


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.path: Path | None = None
        self.error: AdapterFetchError | None = None


class Fetcher:
    def __init__(
        self,
        store: ObjectStore,
        cache: DiskCache,
        metrics: AdapterMetrics,
        *,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        max_bytes: int = 2 * 1024 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.cache, self.metrics = store, cache, metrics
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._new_backoff = partial(Backoff, backoff_initial_s, backoff_max_s, clock)
        self._key_backoff: dict[str, Backoff] = {}
        self.downloads = 0  # completed downloads (tests: one per cold adapter)

    def fetch(self, sha256: str, storage_key: str) -> Path:
        return self.fetch_with_tier(sha256, storage_key)[0]

    def fetch_with_tier(self, sha256: str, storage_key: str) -> tuple[Path, str]:
        """The local directory, and where it came from: ``disk`` (the cache held it) or
        ``object_store`` (this call, or the one it waited for, downloaded it)."""
        hit = self.cache.get(sha256)
        if hit is not None:
            return hit, DISK_TIER
        with self._lock:
            flight = self._flights.get(sha256)
            leader = flight is None
            if flight is None:
                self._refuse_during_backoff(sha256)
                flight = self._flights[sha256] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.path is None:
                raise AdapterFetchError(f"adapter {sha256[:12]} fetch ended without a result")
            return flight.path, TIER
        try:
            flight.path = self._download(sha256, storage_key)
            return flight.path, TIER
        except AdapterFetchError as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[sha256]
            flight.done.set()

    def _refuse_during_backoff(self, sha256: str) -> None:
        backoff = self._key_backoff.get(sha256)
        if backoff is not None and (left := backoff.wait_left()) > 0:
            raise AdapterFetchError(
                f"adapter could not be fetched; retrying in {left:.1f}s (adapter {sha256[:12]})",
                retry_after=left,
            )

    def _download(self, sha256: str, storage_key: str) -> Path:
        start = time.monotonic()
        work = self.cache.new_tmp_dir()
        try:
            bundle, out = work / "bundle.tar", work / "adapter"
            out.mkdir()
            try:
                self.store.get_file(storage_key, bundle)
            except ObjectMissing as exc:
                log.error("adapter %s: %s", sha256, exc)
                self._failed(self._key_backoff.setdefault(sha256, self._new_backoff()), start)
                raise AdapterFetchError(f"adapter {sha256[:12]} is missing from the store") from exc
            except StoreError as exc:  # the detail (endpoint, bucket) goes to the log only
                log.warning("adapter %s: object store unavailable: %s", sha256, exc)
                self.metrics.record_load(TIER, time.monotonic() - start, ok=False)
                left = exc.retry_after or 1.0
                raise AdapterFetchError(
                    f"object store unavailable; retry in {left:.1f}s (adapter {sha256[:12]})",
                    retry_after=left,
                ) from exc
            try:
                self._verify_and_unpack(sha256, bundle, out)
            except InvalidAdapter as exc:
                log.error("adapter %s: stored bundle is corrupt: %s", sha256, exc.message)
                self._failed(self._key_backoff.setdefault(sha256, self._new_backoff()), start)
                raise AdapterFetchError(f"adapter {sha256[:12]} is corrupt: {exc}") from exc
            path = self.cache.install(sha256, out)
            with self._lock:
                self._key_backoff.pop(sha256, None)
                self.downloads += 1
            self.metrics.record_load(TIER, time.monotonic() - start)
            return path
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _verify_and_unpack(self, sha256: str, bundle: Path, out: Path) -> None:
        """Hash the bundle in a second thread while unpacking it into the work dir (hashlib
        releases the GIL; both read the same cached pages): the hash costs as much as the
        unpack, so this halves the CPU part of a download. A bundle whose hash is wrong is
        refused as before, whatever the unpack found; its files stay in the work dir."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-hash") as pool:
            digest = pool.submit(sha256_file, bundle)
            unpack_error: InvalidAdapter | None = None
            try:
                unpack(bundle, out, max_bytes=self.max_bytes)
            except InvalidAdapter as exc:
                unpack_error = exc
            got = digest.result()
        if got != sha256:
            raise InvalidAdapter(f"stored bundle hashes to {got[:12]}, not {sha256[:12]}")
        if unpack_error is not None:
            raise unpack_error

    def _failed(self, backoff: Backoff, start: float) -> None:
        with self._lock:
            backoff.failed()
        self.metrics.record_load(TIER, time.monotonic() - start, ok=False)
