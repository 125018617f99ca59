"""Who is calling: the value authentication hands to every later step of a request."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

SCOPES = ("inference", "adapters:read", "adapters:write", "usage:read")


@dataclass(frozen=True)
class Principal:
    tenant_id: uuid.UUID
    tenant_name: str
    key_id: uuid.UUID | None  # None for the admin token acting on a tenant
    scopes: frozenset[str]
    tenant_limits: dict[str, Any] = field(default_factory=dict)
    key_limits: dict[str, Any] = field(default_factory=dict)
    plan_name: str | None = None
    prompt_price_micros: int = 0  # per million prompt tokens
    completion_price_micros: int = 0  # per million completion tokens

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def fairness(self) -> tuple[str, float, int]:
        """What the engine's fair scheduler keys this tenant's requests by: the tenant id,
        its weight and priority tier (from its plan and its own limits; docs/fairness.md)."""
        lim = self.tenant_limits
        tier = lim.get("priority_tier")
        return (
            str(self.tenant_id),
            float(lim.get("scheduling_weight") or 1),
            1 if tier is None else tier,
        )
