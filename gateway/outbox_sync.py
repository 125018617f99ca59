"""Background fsync of the usage outbox, for ledgers whose commits do not fsync.

The ledger's commits are written to the OS before each response finishes (safe from a
crash of any process); :class:`OutboxSyncer` makes them safe from an OS crash or a power
loss soon after: a thread of its own fsyncs the outbox's WAL once commits have happened,
right away, then waits ``gap_s`` before the next fsync (so it fsyncs at most 1 / gap_s
times a second, however many requests end). A commit is thus fsynced within about
``gap_s`` plus two fsyncs' time. About once a second it also checkpoints the WAL into the
database file (the ledger's own connection never does: a checkpoint fsyncs), which keeps
the WAL small while the ledger writer cannot drain (a database outage).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

from loraplex.gateway.outbox import Outbox

log = logging.getLogger("loraplex.ledger")

CHECKPOINT_EVERY_S = 1.0


class OutboxSyncer:
    def __init__(self, path: Path, gap_s: float) -> None:
        self._outbox = Outbox(path, fsync_commits=False)  # its own connection
        self._gap_s = gap_s
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._checkpointed = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="outbox-sync", daemon=True)
        self._thread.start()
        self.syncs = 0  # fsyncs done (for tests)

    def committed(self) -> None:
        """Commits were made that are not fsynced yet (any thread)."""
        self._dirty.set()

    def _run(self) -> None:
        while True:
            self._dirty.wait()
            if self._stop.is_set():
                return
            self._dirty.clear()
            try:
                self._outbox.sync()
                self.syncs += 1
            except Exception:  # a disk error: report it, try again with the next commits
                log.exception("fsync of the usage outbox failed")
                self._dirty.set()
            now = time.monotonic()
            if now - self._checkpointed >= CHECKPOINT_EVERY_S:
                self._checkpointed = now
                try:
                    self._outbox.checkpoint()
                except sqlite3.Error as exc:  # another process checkpoints: next time
                    log.debug("outbox checkpoint skipped: %s", exc)
            if self._stop.wait(self._gap_s):
                return

    def close(self) -> None:
        """Stop the thread, then fsync whatever is still unsynced."""
        self._stop.set()
        self._dirty.set()
        self._thread.join()
        try:
            self._outbox.sync()
        finally:
            self._outbox.close()
