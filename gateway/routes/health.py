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
    status: Literal["ok"]


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


@router.get("/health")
async def health() -> Health:
    return Health(status="ok")


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
    checks["engine"] = "ok" if engine is not None and engine.is_ready else "not ready"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503
    )
