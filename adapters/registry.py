"""The registry: each upload of a name is a new version; aliases; delete; list and detail.

Write order: validate, pack, put the object (durable), then commit the row. A failure
before the commit leaves no row; an object without a row is collected by :mod:`adapters.gc`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.adapters import queries
from loraplex.adapters.bundle import Bundle, pack
from loraplex.adapters.errors import AdapterConflict, AdapterNotFound, StoreUnavailable
from loraplex.adapters.names import check_name
from loraplex.adapters.spec import BaseModelSpec
from loraplex.adapters.storage import ObjectStore, StoreError, blob_key
from loraplex.adapters.validate import ValidatedAdapter, validate_dir
from loraplex.adapters.values import AdapterInfo, AliasInfo, VersionInfo
from loraplex.tenancy.errors import Unavailable
from loraplex.tenancy.models import Adapter, AdapterAlias, AdapterVersion, AuditLog, utcnow

Sessions = async_sessionmaker[AsyncSession]
log = logging.getLogger("loraplex.adapters")


class AdapterRegistry:
    def __init__(
        self,
        sessions: Sessions,
        store: ObjectStore,
        spec: Callable[[], BaseModelSpec | None],
        *,
        max_rank: int,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.spec = spec
        self.max_rank = max_rank
        # called with the tenant's id after each committed change to what its names resolve
        # to (upload, delete, alias set or deleted): the gateway's model cache forgets them
        self.on_change: list[Callable[[uuid.UUID], None]] = []

    def _changed(self, tenant_id: uuid.UUID) -> None:
        for callback in self.on_change:
            callback(tenant_id)

    async def publish(
        self, tenant_id: uuid.UUID, name: str, adapter_dir: Path, *, actor: str = "system"
    ) -> VersionInfo:
        """Validate the staged PEFT dir, store its bundle, and register a new version."""
        check_name(name)
        spec = self.spec()
        if spec is None:
            raise Unavailable("no base model is loaded yet: adapters cannot be validated")
        valid = await asyncio.to_thread(validate_dir, adapter_dir, spec, max_rank=self.max_rank)
        bundle = await asyncio.to_thread(pack, adapter_dir, adapter_dir / "bundle.tar")
        key = blob_key(bundle.sha256)
        try:
            await asyncio.to_thread(self.store.put_file, key, bundle.path)
        except StoreError as exc:  # the detail (endpoint, bucket) goes to the log only
            log.warning("upload of %s: %s", name, exc)
            raise StoreUnavailable(
                "object store unavailable; nothing was stored", retry_after=exc.retry_after or 1.0
            ) from exc
        attempt = 0
        while True:
            try:
                info = await self._register(tenant_id, name, valid, bundle, spec.name, actor)
            except IntegrityError:  # a concurrent upload took the version number or the name
                attempt += 1
                if attempt >= 5:
                    raise
                await asyncio.sleep(0.01 * attempt)
                continue
            self._changed(tenant_id)
            return info

    async def _register(
        self,
        tenant_id: uuid.UUID,
        name: str,
        valid: ValidatedAdapter,
        bundle: Bundle,
        base_model: str,
        actor: str,
    ) -> VersionInfo:
        async with self.sessions() as s, s.begin():
            adapter = await self._lock_or_create(s, tenant_id, name)
            latest = await s.scalar(
                select(func.max(AdapterVersion.version)).where(
                    AdapterVersion.adapter_id == adapter.id
                )
            )
            row = AdapterVersion(
                adapter_id=adapter.id,
                version=(latest or 0) + 1,
                sha256=bundle.sha256,
                storage_key=blob_key(bundle.sha256),
                base_model=base_model,
                rank=valid.config.rank,
                alpha=valid.config.alpha,
                target_modules=list(valid.target_modules),
                bytes=bundle.size,
                status="ready",
            )
            s.add(row)
            await s.flush()
            adapter.current_version = row.version
            adapter.deleted_at = None
            _audit(s, actor, "adapter.upload", tenant_id, f"{name}@{row.version}",
                   {"sha256": bundle.sha256, "bytes": bundle.size})  # fmt: skip
        return VersionInfo.of(name, row)

    async def _lock_or_create(self, s: AsyncSession, tenant_id: uuid.UUID, name: str) -> Adapter:
        stmt = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        adapter = await s.scalar(stmt.with_for_update())
        if adapter is None:
            if await queries.alias_row(s, tenant_id, name) is not None:
                raise AdapterConflict(f"{name!r} is already an alias; pick another adapter name")
            adapter = Adapter(tenant_id=tenant_id, name=name)
            s.add(adapter)
            await s.flush()
        return adapter

    async def delete(self, tenant_id: uuid.UUID, name: str, *, actor: str = "system") -> None:
        """The name stops resolving at once; its bytes go at the next GC."""
        async with self.sessions() as s, s.begin():
            adapter = await queries.live_adapter(s, tenant_id, name)
            if adapter is None:
                raise AdapterNotFound(f"adapter {name!r} not found", param="name")
            version_ids = select(AdapterVersion.id).where(AdapterVersion.adapter_id == adapter.id)
            await s.execute(
                delete(AdapterAlias).where(AdapterAlias.adapter_version_id.in_(version_ids))
            )
            await s.execute(
                update(AdapterVersion)
                .where(AdapterVersion.adapter_id == adapter.id)
                .values(status="deleted")
            )
            adapter.deleted_at = utcnow()
            adapter.current_version = None
            _audit(s, actor, "adapter.delete", tenant_id, name)
        self._changed(tenant_id)

    async def set_alias(
        self, tenant_id: uuid.UUID, alias: str, name: str, version: int, *, actor: str = "system"
    ) -> AliasInfo:
        """Point ``alias`` at ``name@version`` (create or move). New requests only."""
        check_name(alias, param="alias")
        async with self.sessions() as s, s.begin():
            if await queries.live_adapter(s, tenant_id, alias) is not None:
                raise AdapterConflict(f"{alias!r} is an adapter name; an alias must differ")
            target = await queries.version_row(s, tenant_id, name, version)
            if target is None:
                raise AdapterNotFound(f"adapter {name}@{version} not found", param="version")
            row = await queries.alias_row(s, tenant_id, alias)
            if row is None:
                s.add(AdapterAlias(tenant_id=tenant_id, alias=alias, adapter_version_id=target.id))
            else:
                row.adapter_version_id = target.id
                row.updated_at = utcnow()
            _audit(s, actor, "adapter.alias", tenant_id, alias, {"target": f"{name}@{version}"})
        self._changed(tenant_id)
        return AliasInfo(alias=alias, name=name, version=version)

    async def delete_alias(
        self, tenant_id: uuid.UUID, alias: str, *, actor: str = "system"
    ) -> None:
        async with self.sessions() as s, s.begin():
            row = await queries.alias_row(s, tenant_id, alias)
            if row is None:
                raise AdapterNotFound(f"alias {alias!r} not found", param="alias")
            await s.delete(row)
            _audit(s, actor, "adapter.alias_delete", tenant_id, alias)
        self._changed(tenant_id)

    async def list(self, tenant_id: uuid.UUID) -> list[AdapterInfo]:
        async with self.sessions() as s:
            return await queries.list_adapters(s, tenant_id)

    async def get(self, tenant_id: uuid.UUID, name: str) -> AdapterInfo:
        async with self.sessions() as s:
            info = await queries.adapter_info(s, tenant_id, name)
        if info is None:
            raise AdapterNotFound(f"adapter {name!r} not found", param="name")
        return info

    async def resolve(self, tenant_id: uuid.UUID, model: str) -> VersionInfo | None:
        """``name``, ``name@version`` or an alias -> the ready version, else None."""
        async with self.sessions() as s:
            return await queries.resolve(s, tenant_id, model)


def _audit(
    s: AsyncSession,
    actor: str,
    action: str,
    tenant_id: uuid.UUID,
    target: str,
    detail: dict[str, Any] | None = None,
) -> None:
    s.add(AuditLog(actor=actor, action=action, tenant_id=tenant_id, target=target,
                   detail=detail or {}))  # fmt: skip
