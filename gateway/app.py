"""The app factory: one FastAPI app serving the OpenAI API, the admin API and probes."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from loraplex import heap
from loraplex.admin.audit import AdminAuditMiddleware
from loraplex.admin.console import install_console
from loraplex.admin.oidc import open_oidc
from loraplex.admin.routes import adapters as admin_adapters
from loraplex.admin.routes import audit as admin_audit
from loraplex.admin.routes import keys as admin_keys
from loraplex.admin.routes import plans as admin_plans
from loraplex.admin.routes import tenants as admin_tenants
from loraplex.admin.routes import usage as admin_usage
from loraplex.gateway.adapter_wiring import build_for_app
from loraplex.gateway.auth import KeyAuthenticator
from loraplex.gateway.billing import open_billing
from loraplex.gateway.breakers import BreakerCollector, Breakers
from loraplex.gateway.drain import Drain
from loraplex.gateway.errors import install_error_handlers
from loraplex.gateway.fast_routes import FastInference
from loraplex.gateway.middleware import install_middleware
from loraplex.gateway.openapi import install_openapi
from loraplex.gateway.resolve import ModelResolver
from loraplex.gateway.routes import authz as authz_routes
from loraplex.gateway.routes import chat, completions, health, models, responses
from loraplex.gateway.routes import embeddings as embeddings_routes
from loraplex.gateway.routes import metrics as metrics_routes
from loraplex.gateway.settings import GatewaySettings
from loraplex.gateway.state import Services
from loraplex.tenancy.db import make_engine, make_sessionmaker

if TYPE_CHECKING:
    from loraplex.engine.client import EngineClient

log = logging.getLogger("loraplex.gateway")

EngineFactory = Callable[[], "EngineClient"]


async def wait_for_engine(engine: EngineClient, timeout_s: float) -> None:
    """Until the engine is ready (for a remote one: connected, its tokenizer loaded), at
    most ``timeout_s``; then the app starts either way (``/ready`` says what is missing)."""
    deadline = time.monotonic() + timeout_s
    # polled: the engine client's protocol has health(), no readiness event
    while not engine.health().ready and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


# FastAPI (0.16x) asks the OpenTelemetry API for its global tracer, meter and logger
# providers on every request, to decide whether to instrument it (~20 us of each request
# on the 2-core box). The gateway sets up no OpenTelemetry (its metrics are Prometheus'):
# that per-request probing is turned off where FastAPI has it.
_NO_OTEL: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def create_app(
    settings: GatewaySettings,
    *,
    engine_factory: EngineFactory | None = None,
    engine_wait_s: float = 0.0,
    freeze_heap: bool = False,
) -> FastAPI:
    """Build the app. ``engine_factory`` makes the engine client (in-process or remote;
    called in the lifespan); None serves the control plane only (``/ready`` reports the
    engine as absent). ``engine_wait_s``: how long startup waits for the engine to be
    ready (``wait_for_engine``) before the server takes requests. ``freeze_heap``: the
    process is this app's alone (a gateway worker): its startup heap is frozen once the
    lifespan has built everything (:func:`loraplex.heap.freeze_heap`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        breakers = Breakers.from_settings(settings)
        db = make_engine(settings.resolved_database_url(), settings.db_timeouts())
        sessions = make_sessionmaker(db, breakers.database)
        resolver = ModelResolver(
            sessions, stale_s=settings.model_cache_stale_s, ttl_s=settings.model_cache_ttl_s
        )
        services = Services(settings, db, sessions, breakers, resolver)
        app.state.services = services
        services.keys = KeyAuthenticator(
            services.sessions,
            secret_key=settings.resolved_secret_key(),
            ttl_s=settings.key_cache_ttl_s,
            stale_s=settings.key_cache_stale_s,
        )
        services.keys.start()
        services.drain = Drain()
        undo_drain = services.drain.install(settings.drain_delay_s)
        registry = CollectorRegistry()  # the one /metrics serves
        registry.register(BreakerCollector(breakers))
        services.adapters = build_for_app(
            settings, services.sessions, lambda: services.engine, breakers.object_store
        )
        services.adapters.registry.on_change.append(resolver.forget_tenant)
        billing_stack = AsyncExitStack()
        services.oidc = await billing_stack.enter_async_context(open_oidc(settings))
        billing = await billing_stack.enter_async_context(
            open_billing(settings, services.sessions, registry, lambda: services.engine)
        )
        services.metrics, services.limiter, services.ledger = (
            billing.metrics,
            billing.limiter,
            billing.ledger,
        )
        try:
            if engine_factory is not None:
                services.engine = engine_factory()
                await services.engine.start()  # loads or connects; /ready reports when done
                await wait_for_engine(services.engine, engine_wait_s)
            if freeze_heap:
                heap.freeze_heap()
            yield
        finally:
            if services.engine is not None:
                await services.engine.close()
            await billing_stack.aclose()  # after the engine: its last requests are metered
            await services.keys.aclose()
            await db.dispose()
            if undo_drain is not None:
                undo_drain()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan, **_NO_OTEL)
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(AdminAuditMiddleware)  # inside the request id middleware
    # innermost: the inference routes' usual request skips FastAPI's routing and solving
    app.add_middleware(FastInference, owner=app)
    install_middleware(app, max_body_bytes=settings.max_body_bytes, request_log=settings.access_log)
    # The data plane's routes first: a request is matched against the routers in this
    # order, and no path of one router is a path of another.
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(responses.router)
    app.include_router(embeddings_routes.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(authz_routes.router)
    app.include_router(metrics_routes.router)
    app.include_router(admin_tenants.router)
    app.include_router(admin_keys.router)
    app.include_router(admin_adapters.router)
    app.include_router(admin_adapters.gc_router)
    app.include_router(admin_plans.router)
    app.include_router(admin_usage.router)
    app.include_router(admin_audit.router)
    if settings.console_enabled:
        install_console(app, settings)
    return app
