"""A tensor-parallel worker rank: its own process, started by ``engine/tp_runner.py``.

It builds a :class:`ModelRunner` over its slices, says it is ready, then does what the
driver sends down its pipe, in order: run a step (receiving the previous step's sampled ids
from rank 0 first when the batch reads them), write or clear an adapter slot, stop. It
exits when the engine process is gone: its pipe closes, or (blocked in a collective) its
parent changes.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from loraplex.engine.model.sharding import Shard
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.parallel import TPGroup, no_multicast_env

log = logging.getLogger(__name__)


def _watch_parent(parent: int) -> None:
    """Exit when the engine process is gone, even if blocked in a collective (the parent is
    the engine's fork server, which exits with the engine)."""

    def run() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=run, name="tp-parent", daemon=True).start()


def worker_main(
    rank: int,
    size: int,
    port: int,
    model: str | Path | None,
    opts: dict[str, Any],
    device: torch.device,
    timeout_s: float,
    conn: Connection,
) -> None:
    """One worker rank: build its shard, then run what the driver sends, in order."""
    _watch_parent(os.getppid())
    no_multicast_env()
    if device.type == "cpu":  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    else:
        torch.cuda.set_device(device)
    try:
        tp = TPGroup(Shard(rank, size), device, port=port, timeout_s=timeout_s)
        runner = ModelRunner(model, device=device, tp=tp, **opts)
    except BaseException as exc:
        log.exception("tensor-parallel rank %d could not start", rank)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    conn.send(("ready",))
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except EOFError:
            return  # the engine process is gone
        kind = msg[0]
        if kind == "run":
            _, batch, head = msg
            prev = None
            if head is not None:  # the previous step's sampled ids, from rank 0
                n, dtype = head
                prev = tp.broadcast(torch.empty(n, dtype=dtype, device=device))
            runner.run(batch, prev)
        elif kind == "write":
            runner.write_slot(msg[1], msg[2], msg[3])
        elif kind == "clear":
            runner.clear_slot(msg[1])
        elif kind == "stop":
            return
