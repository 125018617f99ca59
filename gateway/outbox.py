"""The usage outbox: a local SQLite file where a request's usage is durable (fsynced)
before its response finishes, until the ledger writer has committed it to the database.

Why a local file and not a Redis stream: the guarantee is then ours (``synchronous=FULL``
fsyncs every commit), independent of how Redis is persisted (the default is no AOF, which
would lose the stream on a restart) and of whether Redis is up; embedded mode, with no
Redis, runs the same code. The cost: the file lives in the data dir, so a cluster
deployment gives each gateway pod a persistent volume (a pod that comes back drains what
its predecessor left). Several processes may share one file: SQLite locks it, and the
database's ``ON CONFLICT (request_id) DO NOTHING`` makes a double delivery harmless.

Synchronous API; callers run it in a worker thread. Each component (the ledger that
appends, the writer that drains) opens its own ``Outbox``: one connection each, so a
drain never waits on an append (WAL readers do not block the writer).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tenancy.usage import UsageEvent

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
    data: dict[str, Any] = asdict(event)
    for name in ("tenant_id", "api_key_id", "adapter_version_id"):
        data[name] = None if data[name] is None else str(data[name])
    for name in ("started_at", "finished_at"):
        data[name] = data[name].isoformat()
    return json.dumps(data, separators=(",", ":"))


def event_from_json(text: str) -> UsageEvent:
    data = json.loads(text)
    for name in ("tenant_id", "api_key_id", "adapter_version_id"):
        data[name] = None if data[name] is None else uuid.UUID(data[name])
    for name in ("started_at", "finished_at"):
        data[name] = datetime.fromisoformat(data[name])
    return UsageEvent(**data)


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


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # fsync on every commit
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(_SCHEMA)
        self._db = conn

    def _conn(self) -> sqlite3.Connection:
        return self._db

    def append(self, events: list[UsageEvent]) -> None:
        """Durable when this returns (one transaction, one fsync for the whole group)."""
        now = time.time()
        conn = self._conn()
        with self._lock, _transaction(conn):
            conn.executemany(
                "INSERT INTO outbox (request_id, enqueued_at, payload) VALUES (?, ?, ?)",
                [(e.request_id, now, event_to_json(e)) for e in events],
            )

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


class _transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
