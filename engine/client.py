"""``EngineClient``: all that the gateway and the admin API see of the engine.

Two implementations share it: ``engine.inproc_client.InprocEngineClient`` (the step loop in a
thread of this process: tests, tools) and ``engine.remote_client.RemoteEngineClient`` (an
engine server in another process, over a socket: what serves). Only plain, serializable
values cross it (``engine.api``, this module); errors are the typed ``engine.errors``. Importing
this module (and the remote client) needs no torch.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Literal, Protocol

import msgspec

from loraplex.engine.api import AdapterRef, AdapterResidency, Request, RequestOutput
from loraplex.engine.stats import EngineStats

# draining: the engine was asked to stop and finishes what it runs; it takes nothing new
HealthState = Literal["starting", "ready", "draining", "dead", "unreachable"]


class AdapterShape(msgspec.Struct, frozen=True):
    """The base model's shape as adapter validation needs it (ints and names)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    modules: tuple[str, ...]
    num_experts: int = 0  # MoE: experts per layer (their projections: ``experts.<proj>``)
    moe_intermediate_size: int = 0


class ModelInfo(msgspec.Struct, frozen=True):
    """What a client needs to know of the served model, sent once per engine start."""

    engine_id: str  # unique per engine process start
    name: str  # the served name the engine was started with ("" when not given)
    model: str  # the model it loaded (path or dummy:<preset>)
    max_model_len: int
    vocab_size: int
    kv_tokens: int  # the whole KV pool, in tokens (a request must fit it)
    eos_token_ids: tuple[int, ...]
    max_lora_rank: int
    max_loras: int
    device: str
    dtype: str
    adapter_shape: AdapterShape
    tokenizer_files: dict[str, bytes]


class EngineHealth(msgspec.Struct, frozen=True):
    state: HealthState
    detail: str = ""

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class EngineClient(Protocol):
    """Start it, then stream requests through it; one per gateway process."""

    async def start(self) -> None:
        """Begin connecting (remote) or loading (in-process); returns at once."""
        ...

    async def close(self) -> None: ...

    def health(self) -> EngineHealth: ...

    def model_info(self) -> ModelInfo | None:
        """None until the engine is ready."""
        ...

    def tokenizer(self) -> Any:
        """The served model's transformers tokenizer (None until ready)."""
        ...

    def stats(self) -> EngineStats | None:
        """The engine's latest counters (a snapshot; None before the first)."""
        ...

    def metrics_text(self) -> bytes:
        """The engine side's own Prometheus metrics (adapter fetches...), in the text format,
        for the gateway's ``/metrics`` (empty when it has none)."""
        ...

    def generate(self, request: Request) -> AsyncGenerator[RequestOutput, None]:
        """Stream the request's outputs; the last has ``finished=True``.

        The request's own errors (``InvalidRequest``, ``PromptTooLong``, ``AdapterLoadError``,
        ``EngineOverloaded``...) raise on the first iteration when no token was produced;
        ``EngineDead`` when the engine goes away. Leaving early aborts the request.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    async def adapter_residency(self) -> AdapterResidency: ...

    async def load_adapter(self, ref: AdapterRef) -> bool:
        """Start loading into host memory; False when loaded or loading already."""
        ...

    async def unload_adapter(self, key: str) -> bool:
        """Free its GPU slot and host memory (refused while requests use it)."""
        ...
