"""Model resolution: what a request's ``model`` names, inside the caller's tenant only.

``model`` is the served base model's name, an alias, ``<adapter>`` (its current version)
or ``<adapter>@<version>`` (the registry's lookup, ``adapters.queries.resolve``). Anything
else, including another tenant's adapter, is the same 404 ``model_not_found``: a caller
never learns what other tenants hold.

:class:`ModelResolver` remembers each answer for ``ttl_s`` seconds
(``LORAPLEX_MODEL_CACHE_TTL_S``): an adapter request then costs no database round trip
(one was ~2 ms of a ~3 ms gateway share on the 2-core box with SQLite, and it is the one
per-request query a busy fleet would put on its database). A change made through this
process's registry (upload, delete, alias set or removed) applies to its next request at
once (``forget_tenant``); another worker or replica sees it within ``ttl_s``, as it sees a
revoked key within ``key_cache_ttl_s``. ``ttl_s`` 0 asks the database on every request.
A name that does not resolve is never remembered (an upload is usable at once). While the
database is unavailable a model resolved within the last ``stale_s`` seconds still
resolves (stale-if-error), so adapters already on disk or in the engine keep serving. The
base model never touches the database.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.adapters.queries import resolve
from loraplex.adapters.values import VersionInfo
from loraplex.tenancy.errors import DatabaseUnavailable, ModelNotFound
from loraplex.tenancy.principal import Principal


@dataclass(frozen=True)
class Target:
    """What a request runs on. ``version`` None means the base model alone."""

    model: str  # the name as the caller wrote it, echoed in responses
    version: VersionInfo | None


def model_not_found(model: str) -> ModelNotFound:
    return ModelNotFound(
        f"The model `{model[:256]}` does not exist or you do not have access to it.",
        param="model",
    )


async def resolve_model(
    session: AsyncSession, principal: Principal, model: str, *, base_model: str
) -> Target:
    if model == base_model:
        return Target(model=model, version=None)
    found = await resolve(session, principal.tenant_id, model)
    if found is None:
        raise model_not_found(model)
    return Target(model=model, version=found)


class ModelResolver:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        stale_s: float,
        ttl_s: float = 0.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._stale_s = stale_s
        self._ttl_s = ttl_s
        self._epoch = 0  # moves on each forget: an answer read before it is not remembered
        self._max_entries = max_entries
        self._clock = clock
        self._known: OrderedDict[tuple[uuid.UUID, str], tuple[float, VersionInfo]] = OrderedDict()

    async def resolve(self, principal: Principal, model: str, *, base_model: str) -> Target:
        if model == base_model:
            return Target(model=model, version=None)
        key = (principal.tenant_id, model)
        hit = self._known.get(key)
        if hit is not None and self._clock() - hit[0] < self._ttl_s:
            return Target(model=model, version=hit[1])
        epoch = self._epoch
        try:
            async with self._sessions() as session:
                target = await resolve_model(session, principal, model, base_model=base_model)
        except ModelNotFound:
            self._known.pop(key, None)
            raise
        except DatabaseUnavailable:
            hit = self._known.get(key)
            if hit is None or self._clock() - hit[0] > self._stale_s:
                raise
            return Target(model=model, version=hit[1])
        if target.version is not None and epoch == self._epoch:
            self._known.pop(key, None)
            self._known[key] = (self._clock(), target.version)
            if len(self._known) > self._max_entries:
                self._known.popitem(last=False)
        return target

    def forget_tenant(self, tenant_id: uuid.UUID) -> None:
        """What the tenant's names resolved to is asked again (its adapters changed)."""
        self._epoch += 1
        for key in [k for k in self._known if k[0] == tenant_id]:
            del self._known[key]
