"""A bounded local disk cache of unpacked adapter dirs, keyed by sha256, LRU by size.

``root/<sha256>/`` holds ``adapter_config.json`` and ``adapter_model.safetensors``; entries
appear by an atomic rename from ``root/.tmp``. An entry used in the last ``protect_s``
seconds is not evicted (the engine may be reading it), so the cache can briefly exceed
``max_bytes`` when that many adapters are in use at once. Thread-safe.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from loraplex.adapters.metrics import AdapterMetrics

TIER = "disk"
_SHA = re.compile(r"^[0-9a-f]{64}$")


class DiskCache:
    def __init__(
        self, root: Path, max_bytes: int, metrics: AdapterMetrics, *, protect_s: float = 30.0
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.protect_s = protect_s
        self.tmp = root / ".tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)  # leftovers of a crashed process
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()  # sha -> (bytes, used)
        self._total = 0
        found = [p for p in root.iterdir() if p.is_dir() and _SHA.match(p.name)]
        for path in sorted(found, key=lambda p: p.stat().st_mtime):
            size = _dir_size(path)
            self._entries[path.name] = (size, 0.0)
            self._total += size
        self._publish()

    def get(self, sha256: str) -> Path | None:
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is None:
                self.metrics.misses.labels(TIER).inc()
                return None
            self._entries[sha256] = (entry[0], time.monotonic())
            self._entries.move_to_end(sha256)
        self.metrics.hits.labels(TIER).inc()
        return self.root / sha256

    def new_tmp_dir(self) -> Path:
        path = self.tmp / uuid.uuid4().hex
        path.mkdir()
        return path

    def install(self, sha256: str, src: Path) -> Path:
        """Move the filled ``src`` (from :meth:`new_tmp_dir`) into place and evict to fit."""
        target = self.root / sha256
        size = _dir_size(src)
        with self._lock:
            if sha256 in self._entries:
                shutil.rmtree(src, ignore_errors=True)
            else:
                os.replace(src, target)
                self._entries[sha256] = (size, time.monotonic())
                self._total += size
            victims = self._pick_victims(keep=sha256)
        for path in victims:
            shutil.rmtree(path, ignore_errors=True)
        self._publish()
        return target

    def _pick_victims(self, keep: str) -> list[Path]:
        victims = []
        now = time.monotonic()
        for sha, (size, used) in list(self._entries.items()):
            if self._total <= self.max_bytes:
                break
            if sha == keep or now - used < self.protect_s:
                continue
            del self._entries[sha]
            self._total -= size
            trash = self.tmp / f"evict-{sha}-{uuid.uuid4().hex[:8]}"
            os.replace(self.root / sha, trash)  # invisible at once; deleted outside the lock
            victims.append(trash)
            self.metrics.evictions.labels(TIER).inc()
        return victims

    def _publish(self) -> None:
        with self._lock:
            count, total = len(self._entries), self._total
        self.metrics.set_resident(TIER, count, total)

    @property
    def total_bytes(self) -> int:
        return self._total

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._entries


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
