"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

router = APIRouter(tags=["probes"])

CHECK_TIMEOUT_S = 5.0


class Health(BaseModel):
    status: Literal["ok", "dead"]
    detail: str | None = None  # why, when dead


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]  # database, object_store, engine: "ok" or what is wrong


def _list_one(store: Any) -> None:
    next(iter(store.list()), None)  # one listing call: reachable, bucket exists, readable


async def _object_store(services: Any) -> str:
    if services.adapters is None:
        return "not configured"
    try:
        await asyncio.wait_for(
            asyncio.to_thread(_list_one, services.adapters.store), CHECK_TIMEOUT_S
        )
        return "ok"
    except Exception as exc:  # StoreError, timeouts: not ready either way
        return f"error: {type(exc).__name__}"


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health, "description": "The in-process engine died"}},
)
async def health(request: Request) -> JSONResponse:
    """Liveness: this process serves. 503 only when its in-process engine died for good
    (a remote engine that is down is a readiness matter: its supervisor restarts it)."""
    engine = request.app.state.services.engine
    state = None if engine is None else engine.health()
    if state is not None and state.state == "dead":
        return JSONResponse(Health(status="dead", detail=state.detail).model_dump(), 503)
    return JSONResponse(Health(status="ok").model_dump())


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: see `checks`"}},
)
async def ready(request: Request) -> JSONResponse:
    services = request.app.state.services
    checks: dict[str, Any] = {}
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S), services.db.connect() as conn:
            await conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means not ready
        checks["database"] = f"error: {type(exc).__name__}"
    checks["object_store"] = await _object_store(services)
    engine = services.engine
    if engine is None:
        checks["engine"] = "not configured"
    else:
        state = engine.health()
        checks["engine"] = "ok" if state.ready else f"{state.state}: {state.detail}".rstrip(": ")
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503
    )
