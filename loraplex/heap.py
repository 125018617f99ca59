"""The heap of a long-running process once it has started (engine server, gateway worker).

:func:`freeze_heap` collects once, then moves every object alive now (modules, the
model's and the app's objects, what startup left) out of the cyclic collector's reach
(``gc.freeze``). A step or a request makes many small objects, which trigger a full
collection now and then; that collection walked the whole startup heap and stalled the
step loop or the worker's event loop for as long as the walk took (up to 168 ms on the dev
box, ``benchmarks/bench_step_overhead.py``). Frozen objects are still freed by reference
counting; only cycles among them stay, so only a process that keeps what it started with
(not one that makes and drops engines or apps, as tests do) should call it.
"""

from __future__ import annotations

import gc


def freeze_heap() -> None:
    gc.collect()
    gc.freeze()
