"""The limits a plan, a tenant or an API key carries, parsed once from their JSON column.

Every field is optional: ``None`` means "no limit at this level". A tenant's effective
limits are its plan's, overridden field by field by its own; an API key's limits apply on
top of them (both are checked, so a key can only narrow what its tenant may do).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from loraplex.tenancy.errors import InvalidInput

# An upper bound that keeps every counter inside a signed 64-bit integer (Redis, Postgres).
MAX_LIMIT = 2**53
SCHEDULING_RANGES = {"scheduling_weight": (1, 1000), "priority_tier": (0, 2)}


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion tokens
    max_concurrent: int | None = None  # requests in flight at once
    monthly_token_budget: int | None = None  # prompt + completion tokens per calendar month (UTC)
    monthly_spend_budget_micros: int | None = None  # cost per calendar month, micro-units
    # Scheduling (not limits; read from the plan and the tenant, not from keys): the tenant's
    # weight in fair scheduling (1-1000, default 1) and its priority tier (0 high,
    # 1 standard = default, 2 batch), docs/fairness.md.
    scheduling_weight: int | None = None
    priority_tier: int | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None, *, param: str = "limits") -> Limits:
        """Validate a JSON object; raises :class:`InvalidInput` naming the offending field."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise InvalidInput(f"{param} must be a JSON object", param=param)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InvalidInput(
                f"{param}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(known))}",
                param=f"{param}.{unknown[0]}",
            )
        values: dict[str, int | None] = {}
        for name, value in raw.items():
            values[name] = _limit_value(value, f"{param}.{name}")
            low, high = SCHEDULING_RANGES.get(name, (0, MAX_LIMIT))
            v = values[name]
            if v is not None and not low <= v <= high:
                raise InvalidInput(
                    f"{param}.{name} must be in [{low}, {high}] or null", param=f"{param}.{name}"
                )
        return cls(**values)

    @classmethod
    def merge(
        cls, current: Mapping[str, Any], patch: Mapping[str, Any], *, param: str = "limits"
    ) -> Limits:
        """JSON merge patch (RFC 7396) of stored limits: the fields ``patch`` names are set,
        a ``null`` removes one, the others are kept."""
        cls.parse(patch, param=param)  # names and values checked before anything merges
        merged = {**current, **patch}
        return cls.parse({k: v for k, v in merged.items() if v is not None}, param=param)

    def to_json(self) -> dict[str, int]:
        """The fields that are set, as stored in the JSON columns."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def over(self, base: Limits) -> Limits:
        """These limits where set, ``base``'s elsewhere (tenant over plan)."""
        merged = {k: v if v is not None else getattr(base, k) for k, v in asdict(self).items()}
        return Limits(**merged)

    @property
    def has_rates(self) -> bool:
        return any(
            v is not None
            for v in (self.requests_per_minute, self.tokens_per_minute, self.max_concurrent)
        )

    @property
    def has_budgets(self) -> bool:
        return self.monthly_token_budget is not None or self.monthly_spend_budget_micros is not None

    @property
    def empty(self) -> bool:
        return not (self.has_rates or self.has_budgets)


def _limit_value(value: Any, param: str) -> int | None:
    if value is None:
        return None
    # bool is an int subclass in Python; `true` is never a meaningful limit.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidInput(f"{param} must be a whole number or null", param=param)
    if value < 0:
        raise InvalidInput(f"{param} must be 0 or more (null means no limit)", param=param)
    if value > MAX_LIMIT:
        raise InvalidInput(f"{param} must be at most {MAX_LIMIT}", param=param)
    return int(value)


def validate_limits(raw: Any, *, param: str = "limits") -> dict[str, int]:
    """What the admin API calls on a ``limits`` body: the normalized JSON to store."""
    return Limits.parse(raw, param=param).to_json()


def effective_tenant_limits(
    plan_limits: Mapping[str, Any] | None, tenant_limits: Mapping[str, Any] | None
) -> dict[str, int]:
    """The JSON auth puts in ``Principal.tenant_limits``: the tenant's over its plan's."""
    plan = Limits.parse(plan_limits, param="plan.limits")
    return Limits.parse(tenant_limits, param="tenant.limits").over(plan).to_json()
