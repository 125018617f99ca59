"""POST /v1/responses (OpenAI's Responses API): streaming and not, through chat's code."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import Response as HttpResponse

from loraplex.gateway.deps import InferenceDep, ServicesDep
from loraplex.gateway.inference import collect, new_request_id, open_call
from loraplex.gateway.json_body import StrictJsonRoute
from loraplex.gateway.openapi import errors, text_stream
from loraplex.gateway.render import model_response
from loraplex.gateway.responses import chat_request, echo_fields, renamed
from loraplex.gateway.responses_output import OutputBuilder, build_response, response_events
from loraplex.gateway.responses_schemas import Response, ResponsesRequest
from loraplex.gateway.streaming import EngineStream
from loraplex.tenancy.errors import DomainError

router = APIRouter(prefix="/v1", tags=["openai"], route_class=StrictJsonRoute)


@router.post(
    "/responses",
    response_model=Response,
    responses={
        200: text_stream("A response, or its typed events as server-sent events with `stream`"),
        **errors(401, 403, 404, 415, 429, 503),
    },
)
async def responses(
    body: ResponsesRequest, principal: InferenceDep, services: ServicesDep
) -> HttpResponse | EngineStream:
    try:
        chat = chat_request(body)
        call, first = await open_call(services, principal, chat, new_request_id("resp"))
    except DomainError as exc:
        raise renamed(exc) from None
    echo = echo_fields(body)
    plan = call.spec.tool_plan
    if body.stream:
        return EngineStream(call, response_events(call, first, echo, plan))
    choices = await collect(call, first)
    state = choices.states[0]
    builder = OutputBuilder(plan)
    builder.feed("".join(state.text))
    builder.finish(state.finish_reason or "stop")
    result = build_response(call.spec.request_id, int(time.time()), echo, builder, call.last)
    return model_response(result, call.headers)
