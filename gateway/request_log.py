"""One application log line per HTTP request (``LORAPLEX_ACCESS_LOG``), on logger
``loraplex.request``: request id, method, path, status, tenant, model, tokens, latency.
Probes (``/health``, ``/ready``) and ``/metrics`` get none.

The app's edge (``gateway.middleware.GatewayEdge``) opens a :class:`RequestNote` for the
request (a context variable); the authentication dependency notes the tenant and metering
notes the model and the tokens (summed over the engine calls of one request), so the line
is written when the response has been sent, streams included. In text form::

    req_4f1c... POST /v1/chat/completions 200 tenant=default model=base tokens=21+8 41.2ms

With ``LORAPLEX_LOG_FORMAT=json`` the same fields are the keys of one JSON object.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass

from starlette.types import Scope

log = logging.getLogger("loraplex.request")
# Probes and scrapes (a load balancer's, Prometheus', serve's own wait for /ready) would
# drown the requests: they get no line.
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})


@dataclass
class RequestNote:
    tenant: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    metered: bool = False


_current: ContextVar[RequestNote | None] = ContextVar("loraplex_request_note", default=None)


def note_tenant(tenant: str) -> None:
    note = _current.get()
    if note is not None:
        note.tenant = tenant


def note_usage(model: str, prompt_tokens: int, completion_tokens: int) -> None:
    note = _current.get()
    if note is not None:
        note.model = model
        note.prompt_tokens += prompt_tokens
        note.completion_tokens += completion_tokens
        note.metered = True


@dataclass
class OpenNote:
    note: RequestNote
    token: Token[RequestNote | None]
    t0: float  # time.perf_counter() when it was opened


def open_note() -> OpenNote:
    """A request's note, open for the dependencies and metering to fill in
    (``gateway.middleware.GatewayEdge`` opens and closes it)."""
    note = RequestNote()
    return OpenNote(note, _current.set(note), time.perf_counter())


def close_note(opened: OpenNote, scope: Scope, status: int) -> None:
    """The note closed, and its line written."""
    _current.reset(opened.token)
    _write(scope, status, opened.note, (time.perf_counter() - opened.t0) * 1000)


def _write(scope: Scope, status: int, note: RequestNote, latency_ms: float) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    request_id = scope.get("state", {}).get("request_id", "-")
    fields = {
        "request_id": request_id,
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "tenant": note.tenant,
        "model": note.model,
        "prompt_tokens": note.prompt_tokens if note.metered else None,
        "completion_tokens": note.completion_tokens if note.metered else None,
        "latency_ms": round(latency_ms, 1),
    }
    text = f"{request_id} {scope['method']} {scope['path']} {status}"
    if note.tenant is not None:
        text += f" tenant={note.tenant}"
    if note.model is not None:
        text += f" model={note.model}"
    if note.metered:
        text += f" tokens={note.prompt_tokens}+{note.completion_tokens}"
    log.info("%s %.1fms", text, latency_ms, extra={"fields": fields})
