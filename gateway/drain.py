"""Graceful drain of a gateway worker on SIGTERM (a pod being replaced or scaled in).

uvicorn on SIGTERM closes its listener at once, lets the requests in flight (streams
included) finish for ``timeout_graceful_shutdown`` (``drain_grace_s``), then cancels what
is left (each such request is metered ``aborted``, once). In front of that, for
``drain_delay_s``, the worker *drains*: the listener stays open, ``/ready`` answers 503
(the load balancer takes the pod out), and any new request but the probes and
``/metrics`` gets 503 ``draining`` with ``Retry-After`` and ``Connection: close``, so a
client or proxy retries it on another gateway; the streams in flight go on.

The handler wraps uvicorn's own SIGTERM handler (installed before the app's startup runs)
and hands the signal on to it once the delay has passed; a second SIGTERM hands it on at
once. Only in the main thread (where uvicorn installs its handlers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from starlette.types import Send

log = logging.getLogger("loraplex.gateway.drain")

ALWAYS_SERVED = ("/health", "/ready", "/metrics")


class Drain:
    def __init__(self) -> None:
        self.draining = False

    def install(self, delay_s: float) -> Callable[[], None] | None:
        """Wrap the current SIGTERM handler; returns the undo (None when not installed)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return None
        loop = asyncio.get_running_loop()
        hand_on: Callable[[int, FrameType | None], Any] = previous

        def on_term(sig: int, frame: FrameType | None) -> None:
            if self.draining:  # asked again: stop now
                hand_on(sig, frame)
                return
            self.draining = True
            log.info("SIGTERM: draining for %.1fs, then finishing requests in flight", delay_s)
            loop.call_soon_threadsafe(loop.call_later, delay_s, hand_on, sig, None)

        signal.signal(signal.SIGTERM, on_term)

        def undo() -> None:
            if signal.getsignal(signal.SIGTERM) is on_term:
                signal.signal(signal.SIGTERM, previous)

        return undo


async def refuse_draining(send: Send) -> None:
    """The 503 a draining worker answers (``gateway.middleware.GatewayEdge``)."""
    message = "this gateway is shutting down; retry the request"
    error = {"message": message, "type": "service_unavailable", "param": None, "code": "draining"}
    body = json.dumps({"error": error}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
