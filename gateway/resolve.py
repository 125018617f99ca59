"""Model resolution: what a request's ``model`` names, inside the caller's tenant only.

``model`` is the served base model's name, an alias, ``<adapter>`` (its current version)
or ``<adapter>@<version>`` (the registry's lookup, ``adapters.queries.resolve``). Anything
else, including another tenant's adapter, is the same 404 ``model_not_found``: a caller
never learns what other tenants hold.

:class:`ModelResolver` asks the database on every request (an alias moved or a version
uploaded applies to the next request, on every replica) and remembers each answer: while
the database is unavailable a model it resolved within the last ``stale_s`` seconds
still resolves (stale-if-error), so adapters already on disk or in the engine keep
serving. The base model never touches the database.
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
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._stale_s = stale_s
        self._max_entries = max_entries
        self._clock = clock
        self._known: OrderedDict[tuple[uuid.UUID, str], tuple[float, VersionInfo]] = OrderedDict()

    async def resolve(self, principal: Principal, model: str, *, base_model: str) -> Target:
        if model == base_model:
            return Target(model=model, version=None)
        key = (principal.tenant_id, model)
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
        if target.version is not None:
            self._known.pop(key, None)
            self._known[key] = (self._clock(), target.version)
            if len(self._known) > self._max_entries:
                self._known.popitem(last=False)
        return target
