"""The engine server's small HTTP surface, for what Kubernetes and vLLM-aware routers ask of
an engine pod (gateways talk to the engine over its socket protocol, not here):

- ``GET /metrics``: the engine's signals under vLLM's names (``engine.vllm_metrics``),
  then the engine side's own families (adapter fetches...);
- ``GET /health`` (200 unless the step loop died) and ``GET /ready`` (200 once the model
  is loaded, 503 while loading, draining or dead): the pod's probes;
- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and
  ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``, as vLLM's. ``lora_name`` is the
  adapter key (the gateway sends content hashes), ``lora_path`` a local PEFT directory or
  ``store:<object key>``. Load answers once the weights are in host memory (they take a
  GPU slot with the first request); unload frees the GPU slot and host memory (409 while
  requests use the adapter).

The standard library's threaded HTTP server, in a daemon thread: the engine package
stays free of web frameworks, and this surface is a handful of small requests a minute.
Work on the engine runs on the step thread through ``StepLoop.call``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loraplex.engine.api import AdapterRef, AdapterResidency
from loraplex.engine.errors import InvalidRequest
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.step_loop import StepLoop
from loraplex.engine.vllm_metrics import render

log = logging.getLogger("loraplex.engine.http")

CALL_TIMEOUT_S = 5.0
LOAD_TIMEOUT_S = 120.0
MAX_BODY = 64 * 1024


class _Failed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def call_sync(step: StepLoop, fn: Callable[[LLMEngine], Any], timeout_s: float) -> Any:
    """Run ``fn(engine)`` on the step thread and wait for its result here."""
    done = threading.Event()
    box: list[Any] = [None, None]

    def finish(result: Any, error: BaseException | None) -> None:
        box[0], box[1] = result, error
        done.set()

    step.call(fn, finish)
    if not done.wait(timeout_s):
        raise _Failed(503, "the engine did not answer in time")
    if box[1] is not None:
        raise box[1]
    return box[0]


class EngineHttp:
    def __init__(
        self,
        step: StepLoop,
        address: str,
        *,
        model_name: Callable[[], str],
        metrics: Callable[[], bytes] | None = None,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        """``address``: ``host:port`` to listen on (port 0: any free one)."""
        host, _, port = address.rpartition(":")
        self._step, self._model_name = step, model_name
        self._metrics, self._draining = metrics, draining
        self._server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="engine-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("engine HTTP surface on port %d", self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- the routes ------------------------------------------------------------------------

    def residency(self) -> AdapterResidency | None:
        if not self._step.is_ready:
            return None
        try:
            result: AdapterResidency = call_sync(
                self._step, lambda e: e.adapter_residency(), CALL_TIMEOUT_S
            )
        except _Failed:
            return None
        return result

    def metrics_text(self) -> bytes:
        if not self._step.is_ready:
            return b""
        body = render(
            self._step.stats(), self.residency(), model_name=self._model_name(), now=time.time()
        )
        return body + (self._metrics() if self._metrics is not None else b"")

    def load(self, body: dict[str, Any]) -> str:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise _Failed(400, "lora_name and lora_path are required")
        ref = AdapterRef(name, path)
        started = call_sync(self._step, lambda e: e.load_adapter(ref), CALL_TIMEOUT_S)
        if not started:
            raise _Failed(400, f"The lora adapter '{name}' has already been loaded.")
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            res = call_sync(self._step, lambda e: e.adapter_residency(), CALL_TIMEOUT_S)
            if name in res.host or name in res.gpu:
                return f"Success: LoRA adapter '{name}' added successfully."
            if name not in res.loading:
                raise _Failed(400, f"The lora adapter '{name}' could not be loaded (see the log).")
            time.sleep(0.05)
        raise _Failed(503, f"The lora adapter '{name}' is still loading.")

    def unload(self, body: dict[str, Any]) -> str:
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise _Failed(400, "lora_name is required")
        try:
            freed = call_sync(self._step, lambda e: e.unload_adapter(name), CALL_TIMEOUT_S)
        except InvalidRequest as exc:
            raise _Failed(409, exc.message) from None
        if not freed:
            raise _Failed(404, f"The lora adapter '{name}' cannot be found.")
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        surface = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

            def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                step = surface._step
                if self.path == "/metrics":
                    self._reply(200, surface.metrics_text(), "text/plain; version=0.0.4")
                elif self.path == "/health":
                    dead = step.failure is not None
                    self._reply(503 if dead else 200, b"dead" if dead else b"ok")
                elif self.path == "/ready":
                    ok = step.is_ready and not surface._draining()
                    self._reply(200 if ok else 503, b"ok" if ok else b"not ready")
                else:
                    self._reply(404, b"not found")

            def do_POST(self) -> None:
                routes = {"/v1/load_lora_adapter": surface.load,
                          "/v1/unload_lora_adapter": surface.unload}  # fmt: skip
                route = routes.get(self.path)
                if route is None:
                    self._reply(404, b"not found")
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > MAX_BODY:
                        raise _Failed(413, "body too large")
                    body = json.loads(self.rfile.read(length) or b"{}")
                    if not isinstance(body, dict):
                        raise _Failed(400, "the body must be a JSON object")
                    if not surface._step.is_ready:
                        raise _Failed(503, "the engine is not ready")
                    self._reply(200, route(body).encode())
                except _Failed as exc:
                    self._reply(exc.status, _error(exc), "application/json")
                except (ValueError, UnicodeDecodeError):
                    self._reply(400, _error(_Failed(400, "invalid JSON")), "application/json")

        return Handler


def _error(exc: _Failed) -> bytes:
    kind = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError"}
    body = {"object": "error", "message": exc.message,
            "type": kind.get(exc.status, "ServiceUnavailableError"), "code": exc.status}  # fmt: skip
    return json.dumps(body).encode()
