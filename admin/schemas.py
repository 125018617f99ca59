"""Admin API request and response bodies. Requests forbid unknown fields."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from tenancy.api_keys import as_utc
from tenancy.models import ApiKey, Tenant

_REQUEST = ConfigDict(extra="forbid")
# Stored times are UTC; SQLite hands them back without a zone.
UtcTime = Annotated[datetime, AfterValidator(as_utc)]


class TenantCreate(BaseModel):
    model_config = _REQUEST
    name: str = Field(min_length=1, max_length=64)
    plan: str | None = None
    limits: dict[str, Any] = Field(default_factory=dict)


class TenantUpdate(BaseModel):
    """Only the fields sent change; ``"plan": null`` removes the tenant's plan."""

    model_config = _REQUEST
    status: Literal["active", "suspended"] | None = None
    limits: dict[str, Any] | None = None
    plan: str | None = None


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
    name: str = Field(default="", max_length=128)
    scopes: list[str] = Field(default_factory=lambda: ["inference"])
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
