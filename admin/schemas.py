"""Admin API request and response bodies. Requests forbid unknown fields; numbers are
strict (``true`` is not 1); every time is answered in UTC with its zone."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from loraplex.gateway.request_fields import VALID_UNICODE, Text
from loraplex.tenancy.limits import MAX_LIMIT
from loraplex.tenancy.models import ApiKey, Plan, Tenant
from loraplex.tenancy.principal import SCOPES

_REQUEST = ConfigDict(extra="forbid")


def _utc(at: datetime) -> datetime:
    """Stored times are UTC; SQLite hands them back without a zone."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


UtcTime = Annotated[datetime, AfterValidator(_utc)]
# What the services accept, stated in the document too (they check it again).
TENANT_NAME = "^[a-z0-9][a-z0-9_-]{0,63}$"
PLAN_NAME = "^[a-z0-9][a-z0-9_.-]{0,63}$"
TenantName = Annotated[
    str,
    Field(min_length=1, max_length=64, json_schema_extra={"pattern": TENANT_NAME}),
    VALID_UNICODE,
]
PlanName = Annotated[
    str, Field(min_length=1, max_length=64, json_schema_extra={"pattern": PLAN_NAME}), VALID_UNICODE
]
Scope = Annotated[Text, Field(json_schema_extra={"enum": list(SCOPES)})]
Price = Annotated[int, Field(strict=True, ge=0, le=MAX_LIMIT)]


class TenantCreate(BaseModel):
    model_config = _REQUEST
    name: TenantName
    plan: PlanName | None = None
    limits: dict[str, Any] = Field(default_factory=dict)


class TenantUpdate(BaseModel):
    """Only the fields sent change; ``"plan": null`` removes the tenant's plan."""

    model_config = _REQUEST
    status: Literal["active", "suspended"] | None = None
    limits: dict[str, Any] | None = None
    plan: PlanName | None = None


class TenantOut(BaseModel):
    id: uuid.UUID
    name: str
    status: str
    plan: str | None
    limits: dict[str, Any]
    created_at: UtcTime
    updated_at: UtcTime

    @classmethod
    def of(cls, t: Tenant) -> TenantOut:
        return cls(
            id=t.id,
            name=t.name,
            status=t.status,
            plan=t.plan.name if t.plan is not None else None,
            limits=t.limits,
            created_at=t.created_at,
            updated_at=t.updated_at,
        )


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantOut]


class KeyCreate(BaseModel):
    model_config = _REQUEST
    name: Annotated[str, Field(max_length=128), VALID_UNICODE] = ""
    scopes: Annotated[list[Scope], Field(max_length=16)] = Field(
        default_factory=lambda: ["inference"]
    )
    expires_at: datetime | None = None
    limits: dict[str, Any] = Field(default_factory=dict)


class KeyOut(BaseModel):
    id: uuid.UUID
    object: Literal["api_key"] = "api_key"
    tenant: str
    name: str
    prefix: str
    scopes: list[str]
    limits: dict[str, Any]
    created_at: UtcTime
    expires_at: UtcTime | None
    revoked_at: UtcTime | None
    last_used_at: UtcTime | None

    @classmethod
    def of(cls, k: ApiKey, tenant: str) -> KeyOut:
        return cls(
            id=k.id,
            tenant=tenant,
            name=k.name,
            prefix=k.prefix,
            scopes=list(k.scopes),
            limits=k.limits,
            created_at=k.created_at,
            expires_at=k.expires_at,
            revoked_at=k.revoked_at,
            last_used_at=k.last_used_at,
        )


class IssuedKeyOut(KeyOut):
    key: str = Field(description="The full secret key. Shown once; store it now.")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyOut]


class PlanCreate(BaseModel):
    model_config = _REQUEST
    name: PlanName
    prompt_price_micros: Price = Field(0, description="per million prompt tokens")
    completion_price_micros: Price = Field(0, description="per million completion tokens")
    limits: dict[str, Any] = Field(default_factory=dict)


class PlanUpdate(BaseModel):
    model_config = _REQUEST
    prompt_price_micros: Price | None = None
    completion_price_micros: Price | None = None
    limits: dict[str, Any] | None = None


class PlanOut(BaseModel):
    object: Literal["plan"] = "plan"
    name: str
    prompt_price_micros: int
    completion_price_micros: int
    limits: dict[str, Any]
    created_at: UtcTime

    @classmethod
    def of(cls, p: Plan) -> PlanOut:
        return cls(
            name=p.name,
            prompt_price_micros=p.prompt_price_micros,
            completion_price_micros=p.completion_price_micros,
            limits=p.limits,
            created_at=p.created_at,
        )


class PlanList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PlanOut]
