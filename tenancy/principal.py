"""Who is calling: the value authentication hands to every later step of a request."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from loraplex.tenancy.limits import Limits

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

    # Parsed once per principal (authentication caches the principal with its key), not
    # on every request; not fields: they are not part of the value (equality, the wire).
    @cached_property
    def tenant_limits_parsed(self) -> Limits:
        return Limits.parse(self.tenant_limits)

    @cached_property
    def key_limits_parsed(self) -> Limits:
        return Limits.parse(self.key_limits)

    @cached_property
    def tenant_key(self) -> str:
        """``tenant_id`` as a string (the limiter's and the scheduler's key)."""
        return str(self.tenant_id)

    @property
    def fairness(self) -> tuple[str, float, int]:
        """What the engine's fair scheduler keys this tenant's requests by: the tenant id,
        its weight and priority tier (from its plan and its own limits; docs/fairness.md)."""
        lim = self.tenant_limits
        tier = lim.get("priority_tier")
        return (
            self.tenant_key,
            float(lim.get("scheduling_weight") or 1),
            1 if tier is None else tier,
        )
