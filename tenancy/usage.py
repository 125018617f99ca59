"""One finished (or cut-off) request's usage, as the gateway hands it to the ledger."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

UsageStatus = Literal["ok", "aborted", "error"]


@dataclass(frozen=True)
class UsageEvent:
    request_id: str
    tenant_id: uuid.UUID
    api_key_id: uuid.UUID | None
    adapter_version_id: uuid.UUID | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    status: UsageStatus
    started_at: datetime
    finished_at: datetime
    ttft_ms: int | None
    duration_ms: int
    cost_micros: int


def cost_micros(
    prompt_tokens: int, completion_tokens: int, prompt_price: int, completion_price: int
) -> int:
    """Prices are micro-units per million tokens; round half up to whole micro-units."""
    total = prompt_tokens * prompt_price + completion_tokens * completion_price
    return (total + 500_000) // 1_000_000
