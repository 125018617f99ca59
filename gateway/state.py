"""What the lifespan builds and the routes use. Built once per app, never at import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from adapters.service import AdapterServices
    from gateway.auth import KeyAuthenticator
    from gateway.breakers import Breakers
    from gateway.ledger import Ledger
    from gateway.limits import Limiter
    from gateway.metrics import Metrics
    from gateway.resolve import ModelResolver


@dataclass
class Services:
    settings: GatewaySettings
    db: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]  # behind breakers.database
    breakers: Breakers  # database, object store (gateway.breakers)
    resolver: ModelResolver  # model -> base or adapter version, stale-if-error
    engine: Any = None  # engine.async_engine.AsyncEngine, or None while it loads
    keys: KeyAuthenticator | None = None  # API key auth (gateway.auth), built in the lifespan
    adapters: AdapterServices | None = None  # store, registry, disk cache, fetcher (adapters/)
    limiter: Limiter | None = None  # admission (gateway.limits); None: no limits enforced
    ledger: Ledger | None = None  # usage metering (gateway.ledger); None: not recorded
    metrics: Metrics | None = None  # Prometheus registry and instruments (gateway.metrics)
    # Each component adds its own typed field here (object store, registry, limiter, ledger...).
