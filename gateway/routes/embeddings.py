"""POST /v1/embeddings: a text, texts, token ids or token-id lists -> one vector each."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from loraplex.engine.api import AdapterRef
from loraplex.engine.errors import EngineDead
from loraplex.gateway.deps import InferenceDep, ServicesDep
from loraplex.gateway.embedding_schemas import EmbeddingList, EmbeddingRequest
from loraplex.gateway.embeddings import (
    EmbeddingCall,
    EmbeddingSpec,
    check_dimensions,
    input_ids,
    response_body,
)
from loraplex.gateway.inference import new_request_id
from loraplex.gateway.json_body import StrictJsonRoute
from loraplex.gateway.openapi import errors
from loraplex.gateway.prompts import served_model

router = APIRouter(prefix="/v1", tags=["openai"], route_class=StrictJsonRoute)


@router.post(
    "/embeddings",
    response_model=EmbeddingList,
    responses=errors(401, 403, 404, 415, 429, 503),
)
async def embeddings(
    body: EmbeddingRequest, principal: InferenceDep, services: ServicesDep
) -> JSONResponse:
    """Embeddings of the base model or of an adapter (``model`` resolves as in chat): the
    final normed hidden state of each input's last token, L2-normalized (docs/api.md)."""
    model = served_model(services.base_model_name(), services.engine)
    engine = services.engine
    info = None if engine is None else engine.model_info()
    if engine is None or info is None:
        raise EngineDead("The model is not available; retry shortly.")
    check_dimensions(body.dimensions, info.adapter_shape.hidden_size)
    target = await services.resolver.resolve(principal, body.model, base_model=model.name)
    ids = await input_ids(model, body, info.vocab_size, services.settings.embedding_max_tokens)
    adapter = None
    if target.version is not None:
        adapter = AdapterRef.in_store(target.version.sha256, target.version.storage_key)
    spec = EmbeddingSpec(new_request_id("embd"), principal, target, adapter, ids)
    call = EmbeddingCall(engine, spec, services.limiter, services.ledger)
    vectors = await call.run()
    result = response_body(
        spec.request_id, body.model, vectors, body.encoding_format, call.prompt_tokens
    )
    return JSONResponse(result, headers=call.headers)
