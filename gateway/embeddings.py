"""``/v1/embeddings``: inputs -> one engine embedding request each -> one response, metered
once.

Each input becomes an engine request of task ``embed`` (a prefill that returns the pooled
final hidden state, see ``engine.api.EMBEDDING_POOLING``), with the adapter that ``model``
resolves to; the engine batches them with everything else. At most ``IN_FLIGHT`` of one
API request's inputs are in the engine at a time, so one large request cannot fill the
engine's waiting queue. The API request is admitted by the limiter for its prompt tokens,
and records exactly one usage event (prompt tokens, no completion tokens) however it ends.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import sys
import time
from array import array
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio

from loraplex.engine.api import AdapterRef, Request, RequestOutput
from loraplex.engine.client import EngineClient
from loraplex.engine.errors import EngineError
from loraplex.gateway.embedding_schemas import EmbeddingRequest
from loraplex.gateway.inference import UsageSink, record_and_settle
from loraplex.gateway.limits import Admission, Limiter
from loraplex.gateway.prompt_budget import CHARS_PER_TOKEN, CONTEXT_LENGTH_EXCEEDED
from loraplex.gateway.prompts import INLINE_CHARS, ServedModel
from loraplex.gateway.resolve import Target
from loraplex.tenancy.errors import InvalidInput
from loraplex.tenancy.models import utcnow
from loraplex.tenancy.principal import Principal
from loraplex.tenancy.usage import UsageEvent, UsageStatus, cost_micros

log = logging.getLogger("loraplex.gateway.embeddings")
IN_FLIGHT = 64  # one API request's inputs in the engine at once


def check_dimensions(dimensions: int | None, hidden_size: int) -> None:
    """The model's embeddings have ``hidden_size`` values; no other size is offered (a
    decoder LM's hidden state is not trained to be truncated, Matryoshka-style)."""
    if dimensions is not None and dimensions != hidden_size:
        raise InvalidInput(
            f"This model's embeddings have {hidden_size} dimensions and cannot be shortened; "
            f"leave out `dimensions` or set it to {hidden_size}.",
            param="dimensions",
            code="unsupported_value",
        )


def _too_long(max_model_len: int, index: int, what: str) -> InvalidInput:
    return InvalidInput(
        f"This model's maximum context length is {max_model_len} tokens. However, input "
        f"{index} has {what}. Please reduce the length of the input.",
        param="input",
        code=CONTEXT_LENGTH_EXCEEDED,
    )


def _encode(model: ServedModel, texts: list[str]) -> list[list[int]]:
    return [list(model.tokenizer.encode(t)) for t in texts]


async def input_ids(
    model: ServedModel, body: EmbeddingRequest, vocab_size: int, max_tokens: int
) -> list[list[int]]:
    """Each input's token ids, checked: not empty, within the context, ids in the
    vocabulary, at most ``max_tokens`` over all inputs. Text too long for the context is
    refused before it is tokenized (``gateway.prompt_budget``); long text is tokenized in a
    worker thread."""
    inputs = body.inputs()
    n = model.max_model_len
    if isinstance(inputs[0], str):
        texts: list[str] = inputs  # type: ignore[assignment]
        for i, t in enumerate(texts):
            if len(t) > n * CHARS_PER_TOKEN:
                raise _too_long(
                    n, i, f"{len(t)} characters, more than {n * CHARS_PER_TOKEN} can fit"
                )
        chars = sum(map(len, texts))
        if chars > max_tokens * CHARS_PER_TOKEN:
            raise _too_many(max_tokens, f"{chars} characters")
        short = chars <= INLINE_CHARS
        ids = _encode(model, texts) if short else await asyncio.to_thread(_encode, model, texts)
    else:
        ids = inputs  # type: ignore[assignment]
    total = 0
    for i, one in enumerate(ids):
        if not one:
            raise InvalidInput(f"input {i} is empty (no tokens)", param="input")
        if len(one) > n:
            raise _too_long(n, i, f"{len(one)} tokens")
        if max(one) >= vocab_size:
            raise InvalidInput(
                f"input {i} has a token id over this model's vocabulary ({vocab_size} ids)",
                param="input",
            )
        total += len(one)
    if total > max_tokens:
        raise _too_many(max_tokens, f"{total} tokens")
    return ids


def _too_many(max_tokens: int, what: str) -> InvalidInput:
    return InvalidInput(
        f"The inputs of one embedding request may hold at most {max_tokens} tokens in all; "
        f"these have {what}. Please send fewer inputs per request.",
        param="input",
        code="too_many_tokens",
    )


def encode_vector(vector: bytes, encoding_format: str) -> list[float] | str:
    """Little-endian float32 bytes as OpenAI returns them: floats, or base64 of the bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector).decode("ascii")
    values = array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


@dataclass(frozen=True)
class EmbeddingSpec:
    request_id: str
    principal: Principal
    target: Target
    adapter: AdapterRef | None
    inputs: list[list[int]]


class EmbeddingCall:
    """Admit, run every input, meter once (``run`` does it all)."""

    def __init__(
        self,
        engine: EngineClient,
        spec: EmbeddingSpec,
        limiter: Limiter | None,
        ledger: UsageSink | None,
    ) -> None:
        self.spec = spec
        self._engine = engine
        self._limiter = limiter
        self._ledger = ledger
        self._admission: Admission | None = None
        self._started_at = utcnow()
        self._t0 = time.monotonic()
        self.prompt_tokens = 0  # of the inputs done
        self.cached_tokens = 0
        self.engine_ms = 0.0

    @property
    def headers(self) -> dict[str, str]:
        out = dict(self._admission.headers) if self._admission is not None else {}
        if self.engine_ms > 0:
            out["Server-Timing"] = f"engine;dur={self.engine_ms:.3f}"
        return out

    async def run(self) -> list[bytes]:
        """Every input's vector, in order. Raises the first input's error (the others are
        aborted); the usage event is recorded in every case."""
        spec = self.spec
        total = sum(map(len, spec.inputs))
        if self._limiter is not None:
            self._admission = await self._limiter.admit(spec.principal, total, prompt_tokens=total)
        gate = asyncio.Semaphore(IN_FLIGHT)
        tasks = [
            asyncio.ensure_future(self._one(gate, i, ids)) for i, ids in enumerate(spec.inputs)
        ]
        status: UsageStatus = "error"
        try:
            vectors = await asyncio.gather(*tasks)
            status = "ok"
            return vectors
        except asyncio.CancelledError:
            status = "aborted"
            raise
        finally:
            with anyio.CancelScope(shield=True):  # a disconnect cancels us; metering must run
                for t in tasks:
                    t.cancel()  # (their generators close: the engine aborts those requests)
                await asyncio.gather(*tasks, return_exceptions=True)
                await self._meter(status)

    async def _one(self, gate: asyncio.Semaphore, index: int, ids: list[int]) -> bytes:
        spec = self.spec
        key, weight, tier = spec.principal.fairness
        request = Request(
            f"{spec.request_id}-{index}",
            ids,
            adapter=spec.adapter,
            task="embed",
            fairness_key=key,
            fairness_weight=weight,
            priority=tier,
        )
        async with gate:
            last: RequestOutput | None = None
            async with aclosing(self._engine.generate(request)) as outputs:
                async for out in outputs:
                    last = out
        if last is None or not last.finished:
            raise EngineError("the engine ended an embedding request without its result")
        if last.error is not None:
            raise last.exception or EngineError(f"embedding failed: {last.error}")
        if last.embedding is None:
            raise EngineError("the engine ended an embedding request without its result")
        self.prompt_tokens += last.prompt_tokens
        self.cached_tokens += last.cached_tokens
        self.engine_ms = max(self.engine_ms, last.engine_ms)
        return last.embedding

    async def _meter(self, status: UsageStatus) -> None:
        principal = self.spec.principal
        prompt = self.prompt_tokens
        cost = cost_micros(prompt, 0, principal.prompt_price_micros, 0)
        await record_and_settle(
            self._ledger,
            self._event(status, prompt, cost),
            principal.tenant_name,
            self._limiter,
            self._admission,
            prompt,
        )

    def _event(self, status: UsageStatus, prompt: int, cost: int) -> UsageEvent:
        spec, principal = self.spec, self.spec.principal
        return UsageEvent(
            request_id=spec.request_id,
            tenant_id=principal.tenant_id,
            api_key_id=principal.key_id,
            adapter_version_id=spec.target.version.id if spec.target.version else None,
            model=spec.target.model,
            prompt_tokens=prompt,
            completion_tokens=0,
            cached_tokens=self.cached_tokens,
            status=status,
            started_at=self._started_at,
            finished_at=utcnow(),
            ttft_ms=None,
            duration_ms=int((time.monotonic() - self._t0) * 1000),
            cost_micros=cost,
        )


def response_body(
    request_id: str,
    model: str,
    vectors: Sequence[bytes],
    encoding_format: str,
    prompt_tokens: int,
) -> dict[str, Any]:
    """The ``EmbeddingList`` as a plain dict (a 2048 x hidden list of floats is built once,
    not validated again by pydantic)."""
    data = [
        {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {
        "id": request_id,
        "object": "list",
        "created": int(time.time()),
        "data": data,
        "model": model,
        "usage": usage,
    }
