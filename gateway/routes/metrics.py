"""``GET /metrics`` (Prometheus text format) and the middleware that counts responses."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

router = APIRouter(tags=["probes"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    services = request.app.state.services
    body = generate_latest(services.metrics.registry)
    if services.engine is not None:  # the engine side's own families (adapter fetches...)
        body += services.engine.metrics_text()
    return Response(body, media_type=CONTENT_TYPE_LATEST)


class HttpMetricsMiddleware:
    """Counts every response by route template (bounded; ``other`` when none matched),
    method and status code, once the response has been sent (or cut off)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            services = getattr(scope["app"].state, "services", None)
            metrics = getattr(services, "metrics", None)
            if metrics is not None:
                route = scope.get("route")
                template = getattr(route, "path", None) or "other"
                metrics.observe_http(template, scope["method"], status)
