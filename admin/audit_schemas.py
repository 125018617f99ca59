"""Response bodies of the audit log and of ``/admin/v1/me``."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from loraplex.admin.schemas import UtcTime
from loraplex.tenancy.models import AdminAuditEntry


class AuditEntryOut(BaseModel):
    id: int
    at: UtcTime
    actor: str  # OIDC subject, "bootstrap-token", "key:<id>" or "anonymous"
    issuer: str  # the OIDC issuer; "" otherwise
    action: str  # the route's name: create_tenant, rotate_key, export_usage...
    method: str
    target: str  # the path below /admin/v1/
    tenant: str | None
    outcome: int  # the HTTP status answered
    reason: str  # why it was refused: expired, audience, forbidden:manage_keys...
    source: str  # the client's address
    request_id: str

    @classmethod
    def of(cls, row: AdminAuditEntry) -> AuditEntryOut:
        return cls.model_validate(row, from_attributes=True)


class AuditPage(BaseModel):
    data: list[AuditEntryOut]
    next_cursor: str | None  # pass as `cursor` for the next (older) page; null: no more


class MeOut(BaseModel):
    actor: str
    issuer: str
    roles: list[str]  # admin, operator, viewer, tenant-admin:<tenant>
    at: datetime
