"""Which process of a data dir runs the background jobs: whoever holds its leader lock.

``loraplex serve`` runs N gateway workers over one data dir. Every worker appends usage to
the shared outbox, but the jobs that drain it (the ledger writer), raise budget counters
from the ledger and export daily usage must run once, not N times. Each worker tries an
exclusive ``flock`` on a file next to the outbox, without blocking; the one that gets it
runs the jobs until it stops, the others try again every ``retry_s``. The kernel drops the
lock of a process that dies however it dies (SIGKILL included), so when uvicorn restarts a
leader that crashed, a surviving worker has taken the jobs over within ``retry_s``.

The lock file holds the pid of its latest holder, for operators; the lock is what counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("loraplex.billing")


class LeaderLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """True when this process holds the lock now (never blocks)."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor of the open file drops the flock


Jobs = Callable[[asyncio.Event], Awaitable[None]]


async def lead_when_possible(
    lock: LeaderLock,
    jobs: Jobs,
    stop: asyncio.Event,
    *,
    retry_s: float = 2.0,
    on_lead: Callable[[], None] | None = None,
) -> None:
    """Until ``stop``: try the lock every ``retry_s``; once held, run ``jobs(stop)`` (which
    return when ``stop`` is set). The lock stays held until the caller releases it."""
    while not stop.is_set():
        try:
            acquired = lock.try_acquire()
        except OSError as exc:  # the data dir is unwritable: no one can lead; say so
            log.error("cannot take the background jobs' lock %s: %s", lock.path, exc)
            acquired = False
        if acquired:
            log.info("pid %d runs the background jobs (lock %s)", os.getpid(), lock.path)
            if on_lead is not None:
                on_lead()
            await jobs(stop)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), retry_s)
