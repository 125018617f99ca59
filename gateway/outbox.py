"""The usage outbox: a local SQLite file where a request's usage is written before its
response finishes, until the ledger writer has committed it to the database.

Two durability levels, chosen per connection (``Outbox(path, fsync_commits=...)``):

- ``fsync_commits=True`` (``synchronous=FULL``): a commit returns once it is fsynced, so
  it survives an OS crash or a power loss too.
- ``fsync_commits=False`` (``synchronous=NORMAL`` in WAL mode): a commit returns once its
  WAL frames are written to the OS (``write()``, no fsync). It survives a crash of any
  process (SIGKILL included: the kernel holds the data), not an OS crash; :meth:`sync`
  fsyncs the WAL, which makes every commit before it survive that too.

A connection made with ``checkpoints=False`` never checkpoints the WAL into the database
file (a checkpoint fsyncs, inside whichever commit triggers it): the ledger's appending
connection, whose commits must stay short; the writer's draining connection does it.

Why a local file and not a Redis stream: the guarantee is then ours, independent of how
Redis is persisted (the default is no AOF, which would lose the stream on a restart) and
of whether Redis is up; embedded mode, with no Redis, runs the same code. The cost: the
file lives in the data dir, so a cluster deployment gives each gateway pod a persistent
volume (a pod that comes back drains what its predecessor left). Several processes may
share one file: SQLite locks it, and the database's ``ON CONFLICT (request_id) DO NOTHING``
makes a double delivery harmless.

Synchronous API; callers run it in a worker thread, except :meth:`try_append` on a
connection that does not fsync its commits (microseconds; it never waits for a lock).
Each component (the ledger that appends, the writer that drains) opens its own
``Outbox``: one connection each, so a drain never waits on an append (WAL readers do not
block the writer).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from loraplex.tenancy.usage import UsageEvent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    payload TEXT NOT NULL,
    error TEXT NOT NULL,
    failed_at REAL NOT NULL
);
"""


def event_to_json(event: UsageEvent) -> str:
    """JSON of the event: UUIDs as strings, datetimes in ISO 8601 (msgspec: microseconds
    for a ~70 us ``dataclasses.asdict`` + ``json.dumps``)."""
    return _encode(event).decode()


def event_from_json(text: str) -> UsageEvent:
    return _decode(text)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(UsageEvent).decode


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    enqueued_at: float
    event: UsageEvent


@dataclass(frozen=True)
class OutboxStats:
    pending: int
    oldest_enqueued_at: float | None
    dead: int


_BUSY_MS = 30000
_INSERT = "INSERT INTO outbox (request_id, enqueued_at, payload) VALUES (?, ?, ?)"


class Outbox:
    def __init__(self, path: Path, *, fsync_commits: bool = True, checkpoints: bool = True):
        self.path = path
        self.wal_path = path.with_name(path.name + "-wal")
        self.fsync_commits = fsync_commits
        self._wal_inode = 0  # the WAL file whose directory entry sync() has fsynced
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = self._connect(_BUSY_MS, checkpoints)
        self._db.executescript(_SCHEMA)
        # try_append's: never waits for a lock (busy timeout 0)
        self._nowait = None if fsync_commits else self._connect(0, checkpoints)

    def _connect(self, busy_ms: int, checkpoints: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: fsync on every commit; NORMAL: written to the OS on every commit
        conn.execute(f"PRAGMA synchronous={'FULL' if self.fsync_commits else 'NORMAL'}")
        if not checkpoints:
            conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA busy_timeout={busy_ms}")  # (after the setup, which may wait)
        return conn

    def _conn(self) -> sqlite3.Connection:
        return self._db

    def append(self, events: list[UsageEvent]) -> None:
        """Written when this returns (one transaction for the whole group): fsynced, or
        with ``fsync_commits=False`` safe from a process crash (see the module)."""
        rows = self._rows(events)
        conn = self._conn()
        with self._lock, _transaction(conn):
            conn.executemany(_INSERT, rows)

    def try_append(self, events: list[UsageEvent]) -> bool:
        """``append``, unless that would wait: for another connection's write lock (False,
        nothing written) or, with ``fsync_commits``, for an fsync (not allowed)."""
        conn = self._nowait
        if conn is None:
            raise RuntimeError("try_append on an outbox that fsyncs its commits would block")
        rows = self._rows(events)
        if not self._lock.acquire(blocking=False):
            return False
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                return False
            try:
                conn.executemany(_INSERT, rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return True
        finally:
            self._lock.release()

    def sync(self) -> None:
        """fsync the WAL file: every commit made before this call survives an OS crash.
        Opened by name each time (SQLite deletes the WAL when its last connection closes,
        and makes a new one); a new WAL file's directory entry is fsynced too."""
        try:
            fd = os.open(self.wal_path, os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: every commit is in the database file, checkpointed (synced)
        try:
            os.fsync(fd)
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        if inode != self._wal_inode:
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            self._wal_inode = inode

    def checkpoint(self) -> None:
        """Copy the WAL's committed pages into the database file, without waiting for
        anyone (PASSIVE); SQLite fsyncs the WAL before and the database file after."""
        with self._lock:
            self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    @staticmethod
    def _rows(events: list[UsageEvent]) -> list[tuple[str, float, str]]:
        now = time.time()
        return [(e.request_id, now, event_to_json(e)) for e in events]

    def read(self, limit: int) -> list[OutboxRow]:
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT seq, enqueued_at, payload FROM outbox ORDER BY seq LIMIT ?", (limit,)
                )
                .fetchall()
            )
        return [OutboxRow(seq, at, event_from_json(payload)) for seq, at, payload in rows]

    def ack(self, seqs: list[int]) -> None:
        """Forget rows the database has committed."""
        conn = self._conn()
        with self._lock, _transaction(conn):
            conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def dead_letter(self, row: OutboxRow, error: str) -> None:
        """Move a row the database refuses (not an outage: bad data) out of the queue."""
        conn = self._conn()
        with self._lock, _transaction(conn):
            conn.execute(
                "INSERT OR REPLACE INTO dead_letters SELECT seq, request_id, enqueued_at, "
                "payload, ?, ? FROM outbox WHERE seq = ?",
                (error[:2000], time.time(), row.seq),
            )
            conn.execute("DELETE FROM outbox WHERE seq = ?", (row.seq,))

    def stats(self) -> OutboxStats:
        with self._lock:
            conn = self._conn()
            pending, oldest = conn.execute(
                "SELECT count(*), min(enqueued_at) FROM outbox"
            ).fetchone()
            (dead,) = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
        return OutboxStats(int(pending), oldest, int(dead))

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._nowait is not None:
                self._nowait.close()


class _transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
