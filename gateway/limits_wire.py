"""The limits broker's protocol: msgpack-encoded ``msgspec`` structs over ZeroMQ.

A gateway worker (DEALER) sends ``Admit``, ``Settle`` and ``SyncMonth``; the broker
(ROUTER) answers each with one ``Reply`` carrying the same ``call_id``. A ``Settle`` with
``call_id`` 0 wants no answer (the release of an admission whose answer came too late).
The values are the limiter's own dataclasses (``Principal``, ``Admission``, ``Verdict``,
``MonthUsage``), which msgspec encodes field by field (UUIDs, frozensets, enums included),
so both sides build the same rejection from the same verdict.
"""

from __future__ import annotations

import msgspec

from loraplex.gateway.limits import Admission, MonthUsage, Verdict
from loraplex.tenancy.principal import Principal


class Admit(msgspec.Struct, tag="admit", array_like=True):
    call_id: int
    admission_id: str  # chosen by the worker, so it can release a grant it never heard of
    principal: Principal
    reserve_tokens: int
    prompt_tokens: int | None = None


class Settle(msgspec.Struct, tag="settle", array_like=True):
    call_id: int
    admission: Admission
    used_tokens: int
    cost_micros: int | None = None


class SyncMonth(msgspec.Struct, tag="sync", array_like=True):
    call_id: int
    usage: list[MonthUsage]


class Reply(msgspec.Struct, tag="reply", array_like=True):
    call_id: int
    verdict: Verdict | None = None  # for an Admit
    admission: Admission | None = None  # for an Admit that was granted
    error: str = ""  # the broker failed to apply the call


Call = Admit | Settle | SyncMonth


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def call_decoder() -> msgspec.msgpack.Decoder[Call]:
    """What the broker decodes."""
    return msgspec.msgpack.Decoder(Call)


def reply_decoder() -> msgspec.msgpack.Decoder[Reply]:
    """What a worker decodes."""
    return msgspec.msgpack.Decoder(Reply)
