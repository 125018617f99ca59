"""``GET /metrics`` (Prometheus text format); responses are counted by ``gateway.middleware``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["probes"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    services = request.app.state.services
    body = generate_latest(services.metrics.registry)
    if services.engine is not None:  # the engine side's own families (adapter fetches...)
        body += services.engine.metrics_text()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
