"""Liveness and readiness probes.

``/ready`` checks the database and the object store at once, each through its circuit
breaker (an open breaker answers at once, no I/O), each bounded by ``CHECK_TIMEOUT_S``,
and reports the breakers' states beside the checks.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from loraplex.adapters.storage import ObjectStore
from loraplex.gateway.errors import envelope
from loraplex.gateway.openapi import errors
from loraplex.gateway.state import Services
from loraplex.tenancy.errors import DatabaseUnavailable

router = APIRouter(tags=["probes"])

CHECK_TIMEOUT_S = 2.0


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]  # database, object_store, engine: "ok" or what is wrong
    breakers: dict[str, str] = {}  # each dependency's circuit breaker: closed, open...


def _list_one(store: ObjectStore) -> None:
    next(iter(store.list()), None)  # one listing call: reachable, bucket exists, readable


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DatabaseUnavailable):
        return "circuit open" if exc.__cause__ is None else type(exc.__cause__).__name__
    return "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__


async def _database(services: Services) -> str:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S), services.sessions() as session:
            await session.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # any driver error means not ready
        return f"error: {_reason(exc)}"


async def _object_store(services: Services) -> str:
    if services.adapters is None:
        return "not configured"
    try:
        await asyncio.wait_for(
            asyncio.to_thread(_list_one, services.adapters.store), CHECK_TIMEOUT_S
        )
        return "ok"
    except Exception as exc:  # StoreError, timeouts: not ready either way
        return f"error: {_reason(exc)}"


@router.get(
    "/health",
    response_model=Health,
    responses=errors(503),  # the in-process engine died
)
async def health(request: Request) -> JSONResponse:
    """Liveness: this process serves. 503 only when its in-process engine died for good
    (a remote engine that is down is a readiness matter: its supervisor restarts it)."""
    engine = request.app.state.services.engine
    state = None if engine is None else engine.health()
    if state is not None and state.state == "dead":
        return envelope(503, state.detail, "service_unavailable", "engine_dead")
    return JSONResponse(Health(status="ok").model_dump())


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: see `checks`"}},
)
async def ready(request: Request) -> JSONResponse:
    services: Services = request.app.state.services
    database, object_store = await asyncio.gather(_database(services), _object_store(services))
    engine = services.engine
    if engine is None:
        engine_check = "not configured"
    else:
        state = engine.health()
        engine_check = "ok" if state.ready else f"{state.state}: {state.detail}".rstrip(": ")
    checks = {"database": database, "object_store": object_store, "engine": engine_check}
    if services.drain is not None and services.drain.draining:
        checks["gateway"] = "draining"  # SIGTERM: out of the load balancer (gateway.drain)
    ok = all(v == "ok" for v in checks.values())
    body = {
        "status": "ok" if ok else "unavailable",
        "checks": checks,
        "breakers": services.breakers.states(),
    }
    return JSONResponse(body, 200 if ok else 503, headers=None if ok else {"Retry-After": "1"})
