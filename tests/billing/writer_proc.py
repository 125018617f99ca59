"""A ledger writer in its own process, for crash tests.

    python writer_proc.py OUTBOX DB_URL {before_commit,after_commit,none} MARKER

It drains one batch; at the named hook it creates MARKER and hangs, waiting to be killed
with SIGKILL. With ``none`` it drains everything and exits.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from loraplex.gateway.ledger_writer import LedgerWriter, WriterHooks
from loraplex.gateway.metrics import Metrics
from loraplex.gateway.outbox import Outbox, OutboxRow
from loraplex.tenancy.db import make_engine, make_sessionmaker


async def main(outbox_path: str, db_url: str, hook: str, marker: str) -> None:
    async def hang(rows: list[OutboxRow]) -> None:
        await asyncio.to_thread(Path(marker).write_text, str(len(rows)))
        await asyncio.sleep(3600)

    hooks = WriterHooks(**{hook: hang}) if hook != "none" else WriterHooks()
    engine = make_engine(db_url)
    writer = LedgerWriter(
        Outbox(Path(outbox_path)),
        make_sessionmaker(engine),
        Metrics(CollectorRegistry()),
        hooks=hooks,
    )
    while await writer.drain_once():
        pass
    writer.close()
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
