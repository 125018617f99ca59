"""POST /v1/chat/completions: streaming and not."""

from __future__ import annotations

import time
from functools import partial

from fastapi import APIRouter
from fastapi.responses import Response

from loraplex.gateway.deps import InferenceDep, ServicesDep
from loraplex.gateway.inference import collect, new_request_id, open_call
from loraplex.gateway.json_body import StrictJsonRoute
from loraplex.gateway.openapi import errors, text_stream
from loraplex.gateway.render import chat_chunks, model_response
from loraplex.gateway.schemas import ChatCompletion, ChatCompletionRequest
from loraplex.gateway.streaming import EngineStream, chat_usage_chunk, events

router = APIRouter(prefix="/v1", tags=["openai"], route_class=StrictJsonRoute)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: text_stream("A chat completion, or its chunks as server-sent events with `stream`"),
        **errors(401, 403, 404, 415, 429, 503),
    },
)
async def chat_completions(
    body: ChatCompletionRequest, principal: InferenceDep, services: ServicesDep
) -> Response | EngineStream:
    call, first = await open_call(services, principal, body, new_request_id("chatcmpl"))
    id_, created, model = call.spec.request_id, int(time.time()), body.model
    if body.stream:
        plan, think = call.spec.tool_plan, call.spec.reasoning
        chunks = partial(
            chat_chunks, id_, created, model, lp=body.logprobs, plan=plan, reasoning=think
        )
        usage = chat_usage_chunk(id_, created, model) if body.include_usage() else None
        return EngineStream(call, events(call, first, chunks, usage))
    choices = await collect(call, first)
    last = call.last or first
    spec = call.spec
    result = choices.chat(id_, created, model, last, body.logprobs, spec.tool_plan, spec.reasoning)
    return model_response(result, call.headers)
