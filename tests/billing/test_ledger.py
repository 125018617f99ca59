"""The ledger under faults: every request is billed exactly once, whatever dies when."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from billing_helpers import event, ledger_count, ledger_rows, make_tenant
from harness.tcp_proxy import TcpProxy
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url

from loraplex.gateway.ledger import Ledger
from loraplex.gateway.ledger_writer import LedgerWriter
from loraplex.gateway.metrics import Metrics
from loraplex.gateway.outbox import Outbox
from loraplex.tenancy.db import make_engine, make_sessionmaker

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


async def record_all(ledger: Ledger, events) -> None:
    await asyncio.gather(*(ledger.record(e) for e in events))


async def wait_for(path: Path, limit_s: float = 60) -> None:
    for _ in range(int(limit_s * 20)):
        if await asyncio.to_thread(path.exists):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{path} never appeared")


def spawn(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env)


async def test_recorded_usage_reaches_the_ledger_once(sessions, tmp_path):
    tid = await make_tenant(sessions, "acme")
    events = [event(tid, i) for i in range(300)]
    m = metrics()
    ledger = Ledger(Outbox(tmp_path / "outbox.sqlite"), m)
    await record_all(ledger, events)
    await ledger.record(events[0])  # the same request id again: still one record
    writer = LedgerWriter(Outbox(tmp_path / "outbox.sqlite"), sessions, m, batch_size=128)
    while await writer.drain_once():
        pass
    await writer.update_lag()
    assert await ledger_rows(sessions) == {
        e.request_id: (e.prompt_tokens, e.completion_tokens) for e in events
    }
    sample = m.registry.get_sample_value
    assert sample("loraplex_ledger_records_written_total") == 300
    assert sample("loraplex_ledger_pending_records") == 0
    assert sample("loraplex_ledger_lag_seconds") == 0
    assert sample("loraplex_metered_requests_total", {"status": "aborted"}) == 75
    await ledger.aclose()
    writer.close()


@pytest.mark.parametrize("hook", ["before_commit", "after_commit"])
async def test_writer_killed_mid_batch_loses_and_doubles_nothing(sessions, pg_url, tmp_path, hook):
    tid = await make_tenant(sessions, "acme")
    events = [event(tid, i) for i in range(200)]
    path = tmp_path / "outbox.sqlite"
    ledger = Ledger(Outbox(path), metrics())
    await record_all(ledger, events)  # the responses have finished: usage is durable
    await ledger.aclose()

    marker = tmp_path / "marker"
    proc = spawn(str(HERE / "writer_proc.py"), str(path), pg_url, hook, str(marker))
    try:
        await wait_for(marker)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    committed = await ledger_count(sessions)
    assert committed == (0 if hook == "before_commit" else 200)
    assert Outbox(path).stats().pending == 200  # never acknowledged

    m = metrics()
    writer = LedgerWriter(Outbox(path), sessions, m)
    while await writer.drain_once():
        pass
    writer.close()
    assert await ledger_rows(sessions) == {
        e.request_id: (e.prompt_tokens, e.completion_tokens) for e in events
    }
    assert m.registry.get_sample_value("loraplex_ledger_records_written_total") == 200 - committed
    assert Outbox(path).stats().pending == 0


@pytest.mark.parametrize("fsync_commits", [True, False], ids=["fsync-per-commit", "background"])
async def test_gateway_killed_after_responses_keeps_their_usage(sessions, tmp_path, fsync_commits):
    """A process that recorded usage and died at once (SIGKILL) left it in the outbox, also
    when its commits were not fsynced (the kernel holds what was written)."""
    tid = await make_tenant(sessions, "acme")
    path = tmp_path / "outbox.sqlite"
    code = (
        "import asyncio, os, signal, sys, uuid\n"
        "from pathlib import Path\n"
        "from prometheus_client import CollectorRegistry\n"
        "from billing_helpers import event\n"
        "from loraplex.gateway.ledger import Ledger\n"
        "from loraplex.gateway.metrics import Metrics\n"
        "from loraplex.gateway.outbox import Outbox\n"
        "async def main():\n"
        f"    outbox = Outbox(Path({str(path)!r}), fsync_commits={fsync_commits}, "
        f"checkpoints={fsync_commits})\n"
        "    ledger = Ledger(outbox, Metrics(CollectorRegistry()), sync_gap_s=3600)\n"
        f"    tid = uuid.UUID({str(tid)!r})\n"
        "    await asyncio.gather(*(ledger.record(event(tid, i)) for i in range(50)))\n"
        "    await ledger.record(event(tid, 50))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    proc = spawn("-c", code)
    assert proc.wait() == -signal.SIGKILL
    writer = LedgerWriter(Outbox(path), sessions, metrics())
    while await writer.drain_once():
        pass
    writer.close()
    assert len(await ledger_rows(sessions)) == 51


async def test_background_fsync_ledger_commits_on_the_loop_and_fsyncs_after(tmp_path):
    """Records are in the outbox when ``record`` returns, written on the event loop (no
    thread while nobody else holds the lock); the syncer fsyncs soon after, at most once
    per gap however many records come, and once more at close."""
    import threading
    import uuid

    path = tmp_path / "outbox.sqlite"
    ledger = Ledger(Outbox(path, fsync_commits=False, checkpoints=False), metrics(), sync_gap_s=0.5)
    syncer = ledger._syncer
    assert syncer is not None
    tid = uuid.uuid4()
    appenders: set[str] = set()
    real_append = Outbox.append

    def spy(self, events):  # the thread path
        appenders.add(threading.current_thread().name)
        real_append(self, events)

    Outbox.append = spy  # type: ignore[method-assign]
    try:
        for i in range(20):
            await ledger.record(event(tid, i))
            assert Outbox(path).stats().pending == i + 1
    finally:
        Outbox.append = real_append  # type: ignore[method-assign]
    assert appenders == set()  # every commit was made on the loop
    for _ in range(100):
        if syncer.syncs:
            break
        await asyncio.sleep(0.01)
    assert 1 <= syncer.syncs <= 2  # 20 records, one fsync (two if it ran between them)
    synced = syncer.syncs
    await ledger.aclose()
    assert syncer.syncs == synced  # close fsyncs itself, outside the counted loop
    assert not syncer._thread.is_alive()


async def test_background_fsync_ledger_waits_in_a_thread_when_the_outbox_is_locked(tmp_path):
    """Another connection holds the outbox's write lock: the append does not block the
    event loop, it waits in the ledger's thread and is durable once the lock is free."""
    import sqlite3
    import uuid

    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, fsync_commits=False, checkpoints=False)
    ledger = Ledger(outbox, metrics())
    tid = uuid.uuid4()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    assert outbox.try_append([event(tid, 0)]) is False
    recorded = asyncio.create_task(ledger.record(event(tid, 1)))
    await asyncio.sleep(0.3)  # the loop runs on while the append waits for the lock
    assert not recorded.done()
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(recorded, 10)
    assert [r.event.request_id for r in Outbox(path).read(10)] == [event(tid, 1).request_id]
    await ledger.aclose()


def test_try_append_is_refused_on_an_outbox_that_fsyncs_commits(tmp_path):
    import uuid

    with pytest.raises(RuntimeError, match="would block"):
        Outbox(tmp_path / "outbox.sqlite").try_append([event(uuid.uuid4(), 0)])


async def test_database_outage_delays_but_loses_nothing(sessions, pg_url, tmp_path, free_port):
    tid = await make_tenant(sessions, "acme")
    url = make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432, free_port)
    await proxy.restore()
    proxied = make_engine(url.set(port=free_port).render_as_string(hide_password=False))
    path = tmp_path / "outbox.sqlite"
    m = metrics()
    ledger = Ledger(Outbox(path), m)
    writer = LedgerWriter(
        Outbox(path),
        make_sessionmaker(proxied),
        m,
        idle_s=0.05,
        retry_max_s=0.3,
        wake=ledger.appended,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    try:
        first = [event(tid, i) for i in range(100)]
        await record_all(ledger, first)
        await until(lambda: ledger_count(sessions), 100)

        await proxy.refuse()  # the database goes away, mid-traffic
        during = [event(tid, i) for i in range(100, 250)]
        await record_all(ledger, during)  # requests still finish: their usage is durable
        await asyncio.sleep(1.0)
        assert await ledger_count(sessions) == 100
        sample = m.registry.get_sample_value
        assert sample("loraplex_ledger_write_errors_total") >= 1
        assert sample("loraplex_ledger_pending_records") == 150
        assert sample("loraplex_ledger_lag_seconds") > 0.5

        await proxy.restore()
        after = [event(tid, i) for i in range(250, 300)]
        await record_all(ledger, after)
        await until(lambda: ledger_count(sessions), 300)
    finally:
        stop.set()
        await task
        writer.close()
        await ledger.aclose()
        await proxy.refuse()
        await proxied.dispose()
    every = first + during + after
    assert await ledger_rows(sessions) == {
        e.request_id: (e.prompt_tokens, e.completion_tokens) for e in every
    }
    assert Outbox(path).stats().pending == 0


async def until(probe, expected: int, limit_s: float = 30) -> None:
    for _ in range(int(limit_s * 10)):
        if await probe() == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {expected}, got {await probe()}")


async def test_a_refused_row_is_dead_lettered_and_the_rest_written(sessions, tmp_path):
    import uuid

    tid = await make_tenant(sessions, "acme")
    good = [event(tid, i) for i in range(20)]
    orphan = event(uuid.uuid4(), 99)  # no such tenant: the foreign key refuses it
    path = tmp_path / "outbox.sqlite"
    ledger = Ledger(Outbox(path), metrics())
    await record_all(ledger, [*good[:10], orphan, *good[10:]])
    await ledger.aclose()
    m = metrics()
    writer = LedgerWriter(Outbox(path), sessions, m)
    while await writer.drain_once():
        pass
    await writer.update_lag()
    writer.close()
    assert len(await ledger_rows(sessions)) == 20
    stats = Outbox(path).stats()
    assert stats.pending == 0 and stats.dead == 1
    assert m.registry.get_sample_value("loraplex_ledger_dead_letters") == 1


async def test_sqlite_ledger(sqlite_url, tmp_path):
    engine = make_engine(sqlite_url)
    sessions = make_sessionmaker(engine)
    try:
        tid = await make_tenant(sessions, "solo")
        events = [event(tid, i) for i in range(30)]
        ledger = Ledger(Outbox(tmp_path / "outbox.sqlite"), metrics())
        await record_all(ledger, events + events[:5])
        await ledger.aclose()
        writer = LedgerWriter(Outbox(tmp_path / "outbox.sqlite"), sessions, metrics())
        while await writer.drain_once():
            pass
        writer.close()
        assert len(await ledger_rows(sessions)) == 30
    finally:
        await engine.dispose()


async def test_usage_recorded_during_shutdown_is_kept(tmp_path):
    import uuid

    path = tmp_path / "outbox.sqlite"
    ledger = Ledger(Outbox(path), metrics())
    tid = uuid.uuid4()
    await ledger.record(event(tid, 0))
    await ledger.aclose()
    await ledger.record(event(tid, 1))  # a request the engine's shutdown ended late
    assert [r.event.request_id for r in Outbox(path).read(10)] == [
        event(tid, 0).request_id,
        event(tid, 1).request_id,
    ]


def test_outbox_rows_of_the_earlier_encoding_still_decode():
    """Rows an earlier version left in an outbox (``json.dumps`` of ``asdict``, offsets
    written ``+00:00``) read back as the same events."""
    import json
    import uuid
    from dataclasses import asdict
    from datetime import datetime

    from loraplex.gateway.outbox import event_from_json, event_to_json

    e = event(uuid.uuid4(), 5)
    old = {
        k: str(v) if isinstance(v, uuid.UUID) else v.isoformat() if isinstance(v, datetime) else v
        for k, v in asdict(e).items()
    }
    assert event_from_json(json.dumps(old, separators=(",", ":"))) == e
    assert event_from_json(event_to_json(e)) == e
