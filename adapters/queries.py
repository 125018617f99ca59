"""Read-side queries of the registry, each taking an open session."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from loraplex.adapters.names import split_model
from loraplex.adapters.values import AdapterInfo, VersionInfo
from loraplex.tenancy.models import Adapter, AdapterAlias, AdapterVersion


async def live_adapter(s: AsyncSession, tenant_id: uuid.UUID, name: str) -> Adapter | None:
    return await s.scalar(
        select(Adapter).where(
            Adapter.tenant_id == tenant_id, Adapter.name == name, Adapter.deleted_at.is_(None)
        )
    )


async def alias_row(s: AsyncSession, tenant_id: uuid.UUID, alias: str) -> AdapterAlias | None:
    return await s.scalar(
        select(AdapterAlias).where(AdapterAlias.tenant_id == tenant_id, AdapterAlias.alias == alias)
    )


async def version_row(
    s: AsyncSession, tenant_id: uuid.UUID, name: str, version: int
) -> AdapterVersion | None:
    return await s.scalar(
        select(AdapterVersion)
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(
            Adapter.tenant_id == tenant_id,
            Adapter.name == name,
            Adapter.deleted_at.is_(None),
            AdapterVersion.version == version,
            AdapterVersion.status == "ready",
        )
    )


async def resolve(s: AsyncSession, tenant_id: uuid.UUID, model: str) -> VersionInfo | None:
    """An alias first, then ``name`` (current version) or ``name@version``."""
    row = await alias_row(s, tenant_id, model)
    if row is not None:
        hit = (
            await s.execute(
                select(Adapter.name, AdapterVersion)
                .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
                .where(
                    AdapterVersion.id == row.adapter_version_id,
                    AdapterVersion.status == "ready",
                    Adapter.deleted_at.is_(None),
                )
            )
        ).first()
        return VersionInfo.of(hit[0], hit[1]) if hit else None
    name, version = split_model(model)
    if version is None:
        adapter = await live_adapter(s, tenant_id, name)
        if adapter is None or adapter.current_version is None:
            return None
        version = adapter.current_version
    found = await version_row(s, tenant_id, name, version)
    return VersionInfo.of(name, found) if found else None


async def _infos(s: AsyncSession, adapters: list[Adapter]) -> list[AdapterInfo]:
    ids = [a.id for a in adapters]
    if not ids:
        return []
    versions = (
        await s.scalars(
            select(AdapterVersion)
            .where(AdapterVersion.adapter_id.in_(ids), AdapterVersion.status == "ready")
            .order_by(AdapterVersion.version)
        )
    ).all()
    aliases = (
        await s.execute(
            select(AdapterAlias.alias, AdapterVersion.adapter_id, AdapterVersion.version)
            .join(AdapterVersion, AdapterVersion.id == AdapterAlias.adapter_version_id)
            .where(AdapterVersion.adapter_id.in_(ids))
            .order_by(AdapterAlias.alias)
        )
    ).all()
    out = []
    for a in adapters:
        out.append(
            AdapterInfo(
                name=a.name,
                current_version=a.current_version,
                created_at=a.created_at,
                versions=tuple(VersionInfo.of(a.name, v) for v in versions if v.adapter_id == a.id),
                aliases={al: ver for al, aid, ver in aliases if aid == a.id},
            )
        )
    return out


async def list_adapters(s: AsyncSession, tenant_id: uuid.UUID) -> list[AdapterInfo]:
    adapters = (
        await s.scalars(
            select(Adapter)
            .where(Adapter.tenant_id == tenant_id, Adapter.deleted_at.is_(None))
            .order_by(Adapter.name)
        )
    ).all()
    return await _infos(s, list(adapters))


async def adapter_info(s: AsyncSession, tenant_id: uuid.UUID, name: str) -> AdapterInfo | None:
    adapter = await live_adapter(s, tenant_id, name)
    if adapter is None:
        return None
    return (await _infos(s, [adapter]))[0]
