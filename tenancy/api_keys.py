"""API key services: issue, list, revoke, rotate, look up. Admin actions are audited.

A key's secret exists only in the value returned by :func:`create_key` / :func:`rotate_key`;
the database keeps its public prefix and a keyed hash (``tenancy.keys``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from loraplex.tenancy.errors import InvalidInput, NotFound
from loraplex.tenancy.keys import generate_key, hash_secret
from loraplex.tenancy.limits import Limits
from loraplex.tenancy.models import ApiKey, Tenant, utcnow
from loraplex.tenancy.principal import SCOPES
from loraplex.tenancy.tenants import audit, get_tenant

DEFAULT_SCOPES = ("inference",)


@dataclass(frozen=True)
class IssuedKey:
    row: ApiKey
    key: str  # the full secret key: shown once, never stored
    replaced_prefix: str | None = None  # rotation: the prefix of the key it revoked


def as_utc(at: datetime | None) -> datetime | None:
    """Timestamps read back from SQLite lose their zone; every stored one is UTC."""
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


def check_scopes(scopes: Iterable[str]) -> list[str]:
    chosen = list(dict.fromkeys(scopes))
    for scope in chosen:
        if scope not in SCOPES:
            raise InvalidInput(
                f"unknown scope {scope!r}; known: {', '.join(SCOPES)}", param="scopes"
            )
    if not chosen:
        raise InvalidInput("a key needs at least one scope", param="scopes")
    return chosen


def _aware(at: datetime | None, param: str) -> datetime | None:
    if at is not None and at.tzinfo is None:
        raise InvalidInput(f"{param} needs a timezone (e.g. 2030-01-01T00:00:00Z)", param=param)
    return at


async def _issue(
    session: AsyncSession,
    tenant: Tenant,
    *,
    secret_key: str,
    name: str,
    scopes: list[str],
    expires_at: datetime | None,
    limits: dict[str, Any],
) -> IssuedKey:
    prefix, secret, full = generate_key()
    row = ApiKey(
        tenant_id=tenant.id,
        name=name,
        prefix=prefix,
        secret_hash=hash_secret(secret_key, secret),
        scopes=scopes,
        expires_at=expires_at,
        limits=limits,
    )
    session.add(row)
    await session.flush()
    return IssuedKey(row=row, key=full)


async def create_key(
    session: AsyncSession,
    tenant_name: str,
    *,
    secret_key: str,
    actor: str,
    scopes: Iterable[str] = DEFAULT_SCOPES,
    expires_at: datetime | None = None,
    name: str = "",
    limits: Mapping[str, Any] | None = None,
) -> IssuedKey:
    tenant = await get_tenant(session, tenant_name)
    expires_at = _aware(expires_at, "expires_at")
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidInput("expires_at is in the past", param="expires_at")
    issued = await _issue(
        session,
        tenant,
        secret_key=secret_key,
        name=name,
        scopes=check_scopes(scopes),
        expires_at=expires_at,
        limits=Limits.parse(limits).to_json(),
    )
    audit(
        session,
        actor,
        "key.create",
        tenant=tenant,
        target=issued.row.prefix,
        detail={"id": str(issued.row.id), "scopes": issued.row.scopes},
    )
    await session.commit()
    return issued


async def list_keys(session: AsyncSession, tenant_name: str) -> list[ApiKey]:
    tenant = await get_tenant(session, tenant_name)
    rows = await session.scalars(
        select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at)
    )
    return list(rows.all())


async def _key(session: AsyncSession, tenant: Tenant, key_id: uuid.UUID) -> ApiKey:
    row = await session.scalar(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant.id)
    )
    if row is None:
        raise NotFound(f"key {key_id} does not exist for tenant {tenant.name!r}", param="key_id")
    return row


async def revoke_key(
    session: AsyncSession, tenant_name: str, key_id: uuid.UUID, *, actor: str
) -> ApiKey:
    """Idempotent: revoking a revoked key keeps its first revocation time."""
    tenant = await get_tenant(session, tenant_name)
    row = await _key(session, tenant, key_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit(
            session,
            actor,
            "key.revoke",
            tenant=tenant,
            target=row.prefix,
            detail={"id": str(row.id)},
        )
        await session.commit()
    return row


async def rotate_key(
    session: AsyncSession, tenant_name: str, key_id: uuid.UUID, *, secret_key: str, actor: str
) -> IssuedKey:
    """A new key with the old one's name, scopes, limits and expiry; the old one is revoked."""
    tenant = await get_tenant(session, tenant_name)
    old = await _key(session, tenant, key_id)
    if old.revoked_at is not None:
        raise InvalidInput("a revoked key cannot be rotated; create a new one", param="key_id")
    issued = await _issue(
        session,
        tenant,
        secret_key=secret_key,
        name=old.name,
        scopes=list(old.scopes),
        expires_at=old.expires_at,
        limits=dict(old.limits),
    )
    old.revoked_at = utcnow()
    audit(
        session,
        actor,
        "key.rotate",
        tenant=tenant,
        target=old.prefix,
        detail={"old_id": str(old.id), "new_id": str(issued.row.id)},
    )
    await session.commit()
    return IssuedKey(row=issued.row, key=issued.key, replaced_prefix=old.prefix)


async def find_by_prefix(session: AsyncSession, prefix: str) -> tuple[ApiKey, Tenant] | None:
    """The key with this public prefix and its tenant (plan loaded), or None."""
    found = (
        await session.execute(
            select(ApiKey, Tenant)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(ApiKey.prefix == prefix)
        )
    ).first()
    return None if found is None else (found[0], found[1])


async def record_last_used(session: AsyncSession, used: Mapping[uuid.UUID, datetime]) -> None:
    """One batched UPDATE for many keys' ``last_used_at`` (called by the gateway's flusher)."""
    if not used:
        return
    await session.execute(
        update(ApiKey), [{"id": key_id, "last_used_at": at} for key_id, at in used.items()]
    )
    await session.commit()
