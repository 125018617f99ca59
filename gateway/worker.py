"""The app factory of a gateway worker process: settings from the environment that
``loraplex serve`` / ``loraplex gateway`` set, the engine reached over its socket. No torch.

uvicorn imports this by name in each worker process it spawns
(``gateway.worker:create_worker_app``, ``factory=True``).
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys

from fastapi import FastAPI

from loraplex.engine.remote_client import RemoteEngineClient
from loraplex.gateway.app import create_app
from loraplex.gateway.engine_discovery import engine_source
from loraplex.gateway.routed_client import RoutedEngineClient
from loraplex.gateway.settings import GatewaySettings

log = logging.getLogger("loraplex.gateway")
_PR_SET_PDEATHSIG = 1
# How long a worker's startup waits for its engine (connected, the tokenizer loaded: a few
# seconds, more on a loaded machine) before it takes requests. uvicorn gives a worker
# connections as soon as its startup is done, and a new one beside running workers (one
# that replaces a worker that died) is idle, so it would take most of them only to answer
# 503 engine_unavailable. Past this wait (the engine down, or still loading its model on
# a first start) the worker starts anyway and /ready says what it waits for.
ENGINE_WAIT_S = 20.0


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the process that started it dies, so a killed
    supervisor leaves no worker behind holding the port."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not fatal: the supervisor also stops its workers
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable")


def create_worker_app() -> FastAPI:
    settings = GatewaySettings()
    die_with_parent()
    url = settings.engine_url
    token = settings.engine_token or ""
    source = engine_source(settings)
    if source is not None:  # several replicas: one routed client over a remote one each
        return create_app(
            settings,
            engine_factory=lambda: RoutedEngineClient(
                source,
                lambda address: RemoteEngineClient(address, token=token),
                load_factor=settings.engine_load_factor,
                load_floor=settings.engine_load_floor,
                eject_s=settings.engine_eject_s,
                refresh_s=settings.engine_dns_refresh_s,
            ),
            engine_wait_s=ENGINE_WAIT_S,
            freeze_heap=True,
        )
    url = url or settings.engine_urls
    if url is None:
        log.warning("LORAPLEX_ENGINE_URL is not set: this worker serves the control plane only")
        return create_app(settings, freeze_heap=True)
    return create_app(
        settings,
        engine_factory=lambda: RemoteEngineClient(url.strip(" ,"), token=token),
        engine_wait_s=ENGINE_WAIT_S,
        freeze_heap=True,  # a worker process is this app's alone
    )
