"""The engine server's protocol: msgpack-encoded ``msgspec`` structs, one per frame of a
stream socket per gateway process (``engine.transport``).

Why this and not gRPC or JSON: msgspec encodes and decodes these typed structs in a few
microseconds without a schema compiler (vLLM's V1 engine core uses it too), and a plain
socket per gateway process is an ordered channel whose end is the peer's exit.
``benchmarks/bench_ipc.py`` measures a step's batch and a round trip against the
alternatives (ZeroMQ, which this protocol ran on before, included).

A gateway process says ``Hello`` (with the shared token, if the engine has one) on each
connection, then ``Add``/``Abort`` requests and ``Call``s, and ``Ping``s twice a second.
The engine answers with ``Info`` once it is ready, ``Status`` (health and counters) for each
ping, ``Reply`` to calls, and ONE ``Outputs`` message per step per gateway process.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from loraplex.engine.api import AdapterRef, AdapterResidency, EngineOutput, ErrorInfo, Request
from loraplex.engine.client import HealthState, ModelInfo
from loraplex.engine.stats import EngineStats

# ---- gateway -> engine ------------------------------------------------------------------


class Hello(msgspec.Struct, tag="hello", array_like=True):
    token: str = ""


class Add(msgspec.Struct, tag="add", array_like=True):
    request: Request


class Abort(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


CallOp = Literal["residency", "load", "unload"]


class Call(msgspec.Struct, tag="call", array_like=True):
    call_id: int
    op: CallOp
    ref: AdapterRef | None = None
    key: str | None = None


class Ping(msgspec.Struct, tag="ping", array_like=True):
    pass


ClientMessage = Hello | Add | Abort | Call | Ping

# ---- engine -> gateway ------------------------------------------------------------------


class Outputs(msgspec.Struct, tag="out", array_like=True):
    outputs: list[EngineOutput]


class Status(msgspec.Struct, tag="status", array_like=True):
    engine_id: str
    state: HealthState
    detail: str = ""
    stats: EngineStats | None = None
    metrics: bytes = b""  # the engine side's Prometheus text (in answers to pings)


class Info(msgspec.Struct, tag="info", array_like=True):
    info: ModelInfo


class Reply(msgspec.Struct, tag="reply", array_like=True):
    call_id: int
    result: bool | AdapterResidency | None = None
    error: ErrorInfo | None = None


class Refused(msgspec.Struct, tag="refused", array_like=True):
    """The engine does not take this client's messages (no or a wrong token)."""

    detail: str


EngineMessage = Outputs | Status | Info | Reply | Refused


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def client_decoder() -> msgspec.msgpack.Decoder[EngineMessage]:
    """What a gateway decodes (engine messages)."""
    return msgspec.msgpack.Decoder(EngineMessage)


def server_decoder() -> msgspec.msgpack.Decoder[ClientMessage]:
    """What the engine decodes (gateway messages)."""
    return msgspec.msgpack.Decoder(ClientMessage)
