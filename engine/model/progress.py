"""How far a model load is: a progress bar when stderr is a terminal (``make serve``),
else a log line at each quarter (logs, pipes, CI)."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("loraplex.engine.load")


class LoadProgress:
    def __init__(self, what: str, total: int, *, bar: bool | None = None) -> None:
        self.what, self.total, self.done = what, max(total, 1), 0
        self._next_quarter = 1
        self._bar: Any = None
        if bar is None:
            bar = sys.stderr.isatty()
        if bar:
            from rich.progress import Progress

            self._bar = Progress(transient=False)
            self._task = self._bar.add_task(what, total=self.total)
            self._bar.start()

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        while self._next_quarter <= 4 and self.done * 4 >= self._next_quarter * self.total:
            log.info("%s: %d%% (%d of %d)", self.what, 25 * self._next_quarter, self.done,
                     self.total)  # fmt: skip
            self._next_quarter += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> LoadProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
