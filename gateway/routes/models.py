"""GET /v1/models and /v1/models/{model}: the base model and the caller's adapters and
aliases (never another tenant's)."""

from __future__ import annotations

from fastapi import APIRouter

from loraplex.adapters.queries import list_adapters
from loraplex.adapters.values import AdapterInfo
from loraplex.gateway.deps import ModelsReadDep, ServicesDep, SessionDep
from loraplex.gateway.openapi import errors
from loraplex.gateway.schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["openai"])
BASE_OWNER = "loraplex"


def _cards(base: str, tenant: str, info: AdapterInfo) -> list[ModelCard]:
    created = int(info.created_at.timestamp())
    cards = []
    if info.current_version is not None:
        root = f"{info.name}@{info.current_version}"
        cards.append(
            ModelCard(id=info.name, created=created, owned_by=tenant, parent=base, root=root)
        )
    for alias, version in info.aliases.items():
        root = f"{info.name}@{version}"
        cards.append(ModelCard(id=alias, created=created, owned_by=tenant, parent=base, root=root))
    return cards


@router.get("/models", responses=errors(401, 403, 503))
async def list_models(
    principal: ModelsReadDep, services: ServicesDep, session: SessionDep
) -> ModelList:
    base = services.base_model_name()
    data = [ModelCard(id=base, created=0, owned_by=BASE_OWNER, root=base)]
    for info in await list_adapters(session, principal.tenant_id):
        data.extend(_cards(base, principal.tenant_name, info))
    return ModelList(data=data)


@router.get("/models/{model:path}", responses=errors(401, 403, 404, 503))
async def retrieve_model(model: str, principal: ModelsReadDep, services: ServicesDep) -> ModelCard:
    base = services.base_model_name()
    target = await services.resolver.resolve(principal, model, base_model=base)
    if target.version is None:
        return ModelCard(id=base, created=0, owned_by=BASE_OWNER, root=base)
    v = target.version
    return ModelCard(
        id=model,
        created=int(v.created_at.timestamp()),
        owned_by=principal.tenant_name,
        parent=base,
        root=f"{v.name}@{v.version}",
    )
