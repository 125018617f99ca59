"""Model resolution: what a request's ``model`` names, inside the caller's tenant only.

``model`` is the served base model's name, an alias, ``<adapter>`` (its current version)
or ``<adapter>@<version>`` (the registry's lookup, ``adapters.queries.resolve``). Anything
else, including another tenant's adapter, is the same 404 ``model_not_found``: a caller
never learns what other tenants hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from adapters.queries import resolve
from adapters.values import VersionInfo
from tenancy.errors import ModelNotFound
from tenancy.principal import Principal


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
