"""What the lifespan builds and the routes use. Built once per app, never at import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loraplex.gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from loraplex.adapters.service import AdapterServices
    from loraplex.admin.oidc import OidcVerifier
    from loraplex.engine.client import EngineClient
    from loraplex.gateway.auth import KeyAuthenticator
    from loraplex.gateway.breakers import Breakers
    from loraplex.gateway.drain import Drain
    from loraplex.gateway.ledger import Ledger
    from loraplex.gateway.limits import Limiter
    from loraplex.gateway.metrics import Metrics
    from loraplex.gateway.resolve import ModelResolver


@dataclass
class Services:
    settings: GatewaySettings
    db: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]  # behind breakers.database
    breakers: Breakers  # database, object store (gateway.breakers)
    resolver: ModelResolver  # model -> base or adapter version, stale-if-error
    engine: EngineClient | None = None  # in-process or remote (engine.client); None: no engine
    keys: KeyAuthenticator | None = None  # API key auth (gateway.auth), built in the lifespan
    adapters: AdapterServices | None = None  # store, registry, disk cache, fetcher (adapters/)
    limiter: Limiter | None = None  # admission (gateway.limits); None: no limits enforced
    ledger: Ledger | None = None  # usage metering (gateway.ledger); None: not recorded
    metrics: Metrics | None = None  # Prometheus registry and instruments (gateway.metrics)
    oidc: OidcVerifier | None = None  # admin OIDC access tokens (admin.oidc); None: off
    drain: Drain | None = None  # SIGTERM: draining (gateway.drain)

    def base_model_name(self) -> str:
        """The base model's name in the API: the configured one; else, when this gateway
        was not told the model (``loraplex gateway --engine``), the engine's own name."""
        s = self.settings
        if not s.served_model_name and not s.model and self.engine is not None:
            info = self.engine.model_info()
            if info is not None and info.name:
                return info.name
        return s.base_model_name()
