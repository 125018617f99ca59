"""One request's life in the engine: admitted, run, then settled and metered exactly once.

``EngineCall.start`` admits the request with the limiter and submits it to the engine,
waiting for its first output so that the request's own errors (a prompt too long, an
adapter that cannot load, an overloaded engine) still become a proper HTTP status.
``finish`` is idempotent: it aborts the engine request if it is still running (the KV
cache is freed), settles the limiter's reservation with the tokens really used, and
records one :class:`UsageEvent` (``ok``, ``aborted`` or ``error``) with the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import anyio

from loraplex.engine.api import AdapterRef, Request, RequestOutput, SamplingParams
from loraplex.engine.client import EngineClient
from loraplex.engine.errors import AdapterLoadError, EngineError
from loraplex.gateway.chat_messages import ToolPlan, plan_tools, template_text
from loraplex.gateway.limits import Admission, Limiter
from loraplex.gateway.prompts import prompt_ids, sampling_params, served_model
from loraplex.gateway.reasoning import reasoning_for_template, with_think_block
from loraplex.gateway.render import Choices
from loraplex.gateway.request_log import note_usage
from loraplex.gateway.resolve import Target
from loraplex.gateway.schemas import ChatCompletionRequest, CompletionRequest
from loraplex.gateway.state import Services
from loraplex.tenancy.errors import InvalidInput, Unavailable
from loraplex.tenancy.models import utcnow
from loraplex.tenancy.principal import Principal
from loraplex.tenancy.usage import UsageEvent, UsageStatus, cost_micros

log = logging.getLogger("loraplex.gateway.inference")


class UsageSink(Protocol):
    def record_nowait(self, event: UsageEvent, tenant: str = "") -> asyncio.Future[None]:
        """Queue (or write) the event; the future resolves once it is durable."""
        ...


@dataclass(frozen=True)
class CallSpec:
    """Everything the engine is asked to do for one API request."""

    request_id: str
    principal: Principal
    target: Target
    prompt_ids: list[int]
    sampling: SamplingParams
    adapter: AdapterRef | None
    tool_plan: ToolPlan | None = None  # chat: how the output is read for tool calls
    reasoning: bool = False  # chat: think blocks go to reasoning_content (gateway.reasoning)


class EngineCall:
    def __init__(
        self,
        engine: EngineClient,
        spec: CallSpec,
        limiter: Limiter | None,
        ledger: UsageSink | None,
    ) -> None:
        self.spec = spec
        self._engine = engine
        self._limiter = limiter
        self._ledger = ledger
        self._admission: Admission | None = None
        self._outputs: AsyncGenerator[RequestOutput, None] | None = None
        self._started_at: datetime = utcnow()
        self._t0 = time.monotonic()
        self._ttft_s: float | None = None
        self.last: RequestOutput | None = None
        self._engine_aborted = False
        self._finished = False

    @property
    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` values of the admission, for the response; once the engine is
        done, its own time for the request as ``Server-Timing: engine;dur=<ms>``."""
        out = dict(self._admission.headers) if self._admission is not None else {}
        last = self.last
        if last is not None and last.finished and last.engine_ms > 0:
            out["Server-Timing"] = f"engine;dur={last.engine_ms:.3f}"
        return out

    @property
    def done(self) -> bool:
        return self.last is not None and self.last.finished

    async def start(self) -> RequestOutput:
        """Admit and submit; returns the first output. On any error the call is finished
        (status ``error``) and the error propagates to the route's handler."""
        spec = self.spec
        if self._limiter is not None:
            reserve = len(spec.prompt_ids) + spec.sampling.max_tokens * spec.sampling.n
            self._admission = await self._limiter.admit(
                spec.principal, reserve, prompt_tokens=len(spec.prompt_ids)
            )
        key, weight, tier = spec.principal.fairness
        request = Request(
            spec.request_id,
            spec.prompt_ids,
            spec.sampling,
            spec.adapter,
            fairness_key=key,
            fairness_weight=weight,
            priority=tier,
        )
        try:
            self._outputs = self._engine.generate(request)
            first = await self.next()
            if first is None:
                raise EngineError("the engine ended the request without any output")
            if first.finished and first.error is not None and first.completion_tokens == 0:
                # Failed before any token (an adapter that cannot load or does not fit):
                # the typed cause picks the status (400 incompatible, 503 unavailable).
                raise first.exception or AdapterLoadError(first.error)
        except BaseException:
            await self.finish("error")
            raise
        return first

    async def next(self) -> RequestOutput | None:
        """The next output, or None after the last."""
        if self._outputs is None or self.done:
            return None
        try:
            out = await anext(self._outputs)
        except StopAsyncIteration:
            return None
        if self._ttft_s is None and out.completion_tokens > 0:
            self._ttft_s = time.monotonic() - self._t0
        if any(d.finish_reason == "abort" for d in out.deltas):
            self._engine_aborted = True  # e.g. the engine shutting down under us
        self.last = out
        return out

    async def finish(self, status: UsageStatus | None = None) -> None:
        """Idempotent. ``status`` None: ``ok`` when the engine completed the request, else
        ``aborted`` (the client left, or the engine stopped it); an engine-reported error
        counts as ``error``."""
        if self._finished:
            return
        self._finished = True
        with anyio.CancelScope(shield=True):  # a disconnect cancels us; metering must run
            if self._outputs is not None:
                await self._outputs.aclose()  # the engine aborts an unfinished request
            if status is None:
                status = "ok" if self.done and not self._engine_aborted else "aborted"
            if self.last is not None and self.last.error is not None:
                status = "error"
            await self._meter(status)

    async def _meter(self, status: UsageStatus) -> None:
        spec, last = self.spec, self.last
        prompt = last.prompt_tokens if last is not None else 0
        completion = last.completion_tokens if last is not None else 0
        principal = spec.principal
        cost = cost_micros(
            prompt, completion, principal.prompt_price_micros, principal.completion_price_micros
        )
        note_usage(spec.target.model, prompt, completion)
        await record_and_settle(
            self._ledger,
            self._event(status, prompt, completion, cost),
            principal.tenant_name,
            self._limiter,
            self._admission,
            prompt + completion,
        )

    def _event(self, status: UsageStatus, prompt: int, completion: int, cost: int) -> UsageEvent:
        spec, last, principal = self.spec, self.last, self.spec.principal
        return UsageEvent(
            request_id=spec.request_id,
            tenant_id=principal.tenant_id,
            api_key_id=principal.key_id,
            adapter_version_id=spec.target.version.id if spec.target.version else None,
            model=spec.target.model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=last.cached_tokens if last is not None else 0,
            status=status,
            started_at=self._started_at,
            finished_at=utcnow(),
            ttft_ms=None if self._ttft_s is None else int(self._ttft_s * 1000),
            duration_ms=int((time.monotonic() - self._t0) * 1000),
            cost_micros=cost,
        )


async def record_and_settle(
    ledger: UsageSink | None,
    event: UsageEvent,
    tenant: str,
    limiter: Limiter | None,
    admission: Admission | None,
    used_tokens: int,
) -> None:
    """Meter one request: its usage record queued (or written) first, the limiter settled
    while that write is under way (and even if recording failed), then the record durable
    (see ``gateway.ledger``) before returning."""
    durable = None
    try:
        if ledger is not None:
            durable = ledger.record_nowait(event, tenant)
    finally:
        if limiter is not None and admission is not None:
            try:
                await limiter.settle(admission, used_tokens, cost_micros=event.cost_micros)
            except Exception:  # the limiter's store is down: the usage record is safe
                log.exception("could not settle admission of %s", event.request_id)
    if durable is not None:
        if not durable.done():
            await asyncio.shield(durable)
        durable.result()  # (OutboxUnavailable: the record stays queued, retried)


def new_request_id(prefix: str) -> str:
    """The response id, also the engine's and the ledger's request id. Never the client's
    ``x-request-id``: a reused one must not merge two requests' usage records."""
    return f"{prefix}-{os.urandom(16).hex()}"  # 128 random bits, as uuid4 (4x faster)


async def open_call(
    services: Services,
    principal: Principal,
    body: ChatCompletionRequest | CompletionRequest,
    request_id: str,
) -> tuple[EngineCall, RequestOutput]:
    """Resolve, tokenize, admit and submit; returns the started call and its first output.

    The database session lives only for the resolution: a long stream holds no connection.
    """
    calls = await open_calls(services, principal, body, request_id)
    return calls[0]


async def open_calls(
    services: Services,
    principal: Principal,
    body: ChatCompletionRequest | CompletionRequest,
    request_id: str,
) -> list[tuple[EngineCall, RequestOutput]]:
    """One started call per prompt (a completions request may hold several; the calls of
    the second and later ones have ids ``<request_id>-<i>``, each metered on its own). If
    one cannot start, those already started are finished and the error propagates."""
    if body.stream_options is not None and not body.stream:
        raise InvalidInput(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
    model = served_model(services.base_model_name(), services.engine)
    target = await services.resolver.resolve(principal, body.model, base_model=model.name)
    plan, reasoning = None, False
    if isinstance(body, ChatCompletionRequest):
        template = template_text(model.tokenizer)
        plan = plan_tools(body, template, services.settings.tool_call_parser)
        reasoning = reasoning_for_template(template)
        prompts: list[str | list[int] | None] = [None]
    else:
        prompts = list(body.prompts())
    tokenized = []
    for prompt in prompts:
        ids = await prompt_ids(model, body, plan, prompt)
        sampling = sampling_params(model, body, len(ids), plan)
        if reasoning and sampling.grammar is not None:  # the grammar waits out a think block
            sampling = with_think_block(sampling, model.tokenizer)
        tokenized.append((ids, sampling))
    adapter = None
    if target.version is not None:
        # the engine side fetches it from the same object store, keyed by content hash
        adapter = AdapterRef.in_store(target.version.sha256, target.version.storage_key)
    engine = services.engine
    if engine is None:
        raise Unavailable("no engine is configured on this server")
    started: list[tuple[EngineCall, RequestOutput]] = []
    try:
        for i, (ids, sampling) in enumerate(tokenized):
            rid = request_id if i == 0 else f"{request_id}-{i}"
            spec = CallSpec(rid, principal, target, ids, sampling, adapter, plan, reasoning)
            call = EngineCall(engine, spec, services.limiter, services.ledger)
            started.append((call, await call.start()))
    except BaseException:
        for call, _ in started:
            await call.finish("aborted")
        raise
    return started


async def collect(call: EngineCall, first: RequestOutput) -> Choices:
    """A whole (non-streaming) response: every output until the last, then ``finish``."""
    choices = Choices(call.spec.sampling.n)
    try:
        out: RequestOutput | None = first
        while out is not None:
            choices.add(out)
            out = await call.next()
    except EngineError:  # the engine died under the request
        await call.finish("error")
        raise
    finally:
        await call.finish()
    last = call.last
    if last is not None and last.error is not None:
        raise last.exception or EngineError(f"generation failed: {last.error}")
    return choices
