"""Helpers shared by the limiter tests (a module of its own: conftest is not importable)."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry

from loraplex.gateway.metrics import Metrics
from loraplex.tenancy.principal import Principal


def new_metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def principal(
    tenant_limits: dict[str, Any] | None = None,
    key_limits: dict[str, Any] | None = None,
    *,
    tenant_id: uuid.UUID | None = None,
    key_id: uuid.UUID | None = None,
    prompt_price: int = 0,
    completion_price: int = 0,
) -> Principal:
    tid = tenant_id or uuid.uuid4()
    return Principal(
        tenant_id=tid,
        tenant_name=f"t-{tid.hex[:8]}",
        key_id=key_id or uuid.uuid4(),
        scopes=frozenset({"inference"}),
        tenant_limits=tenant_limits or {},
        key_limits=key_limits or {},
        prompt_price_micros=prompt_price,
        completion_price_micros=completion_price,
    )


@contextmanager
def broker_address() -> Iterator[str]:
    """An ipc:// address in a short temporary directory (a socket path must fit 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="lpx-") as tmp:
        yield f"ipc://{tmp}/limits.sock"
