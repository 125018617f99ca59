"""POST /v1/completions: streaming and not; one prompt or several."""

from __future__ import annotations

import asyncio
import time
from functools import partial

from fastapi import APIRouter
from fastapi.responses import Response

from loraplex.gateway.deps import InferenceDep, ServicesDep
from loraplex.gateway.inference import collect, new_request_id, open_calls
from loraplex.gateway.json_body import StrictJsonRoute
from loraplex.gateway.openapi import errors, text_stream
from loraplex.gateway.prompts import check_completion_options, served_model
from loraplex.gateway.render import SYSTEM_FINGERPRINT, completion_chunks, model_response, usage
from loraplex.gateway.schemas import Completion, CompletionRequest
from loraplex.gateway.state import Services
from loraplex.gateway.streaming import EngineStream, completion_usage_chunk, events_of

router = APIRouter(prefix="/v1", tags=["openai"], route_class=StrictJsonRoute)


def echo_texts(services: Services, body: CompletionRequest) -> list[str]:
    """Each prompt as text (token ids decoded), for ``echo``."""
    tokenizer = served_model(services.base_model_name(), services.engine).tokenizer
    return [p if isinstance(p, str) else tokenizer.decode(p) for p in body.prompts()]


@router.post(
    "/completions",
    response_model=Completion,
    responses={
        200: text_stream("A completion, or its chunks as server-sent events with `stream`"),
        **errors(401, 403, 404, 415, 429, 503),
    },
)
async def completions(
    body: CompletionRequest, principal: InferenceDep, services: ServicesDep
) -> Response | EngineStream:
    check_completion_options(body)
    calls = await open_calls(services, principal, body, new_request_id("cmpl"))
    id_, created, model = calls[0][0].spec.request_id, int(time.time()), body.model
    lp, n = body.logprobs is not None, body.n
    echo = echo_texts(services, body) if body.echo else None
    if body.stream:
        makers = [
            (
                call,
                first,
                partial(
                    completion_chunks,
                    id_,
                    created,
                    model,
                    lp=lp,
                    offset=p * n,
                    echo=None if echo is None else echo[p],
                ),
            )
            for p, (call, first) in enumerate(calls)
        ]
        usage_chunk = completion_usage_chunk(id_, created, model) if body.include_usage() else None
        return EngineStream([c for c, _ in calls], events_of(makers, usage_chunk))
    if len(calls) == 1:  # the usual request: no task (and event loop turn) for one prompt
        collected = [await collect(*calls[0])]
    else:
        collected = await asyncio.gather(*(collect(call, first) for call, first in calls))
    result = Completion(
        id=id_,
        created=created,
        model=model,
        system_fingerprint=SYSTEM_FINGERPRINT,
        choices=[],
        usage=usage(*(call.last or first for call, first in calls)),
    )
    for p, choices in enumerate(collected):
        for choice in choices.completion_choices(lp):
            choice.index += p * n
            if echo is not None:
                choice.text = echo[p] + choice.text
            result.choices.append(choice)
    return model_response(result, calls[0][0].headers)
