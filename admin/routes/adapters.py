"""A tenant's adapters: upload (multipart, streamed to disk), list, show, delete, aliases."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from datetime import timedelta
from pathlib import Path

from fastapi import APIRouter, Request

from loraplex.adapters.gc import collect_garbage
from loraplex.adapters.names import check_name
from loraplex.adapters.upload import stage
from loraplex.admin.adapter_access import AdapterReadDep, AdaptersDep, AdapterWriteDep
from loraplex.admin.adapter_schemas import (
    UPLOAD_BODY,
    AdapterList,
    AdapterOut,
    AliasIn,
    AliasOut,
    Deleted,
    GcIn,
    GcOut,
    VersionOut,
)
from loraplex.admin.auth import AdminDep
from loraplex.admin.multipart import read_upload
from loraplex.gateway.json_body import StrictJsonRoute
from loraplex.gateway.openapi import errors

router = APIRouter(
    prefix="/admin/v1/tenants/{tenant}/adapters",
    tags=["admin: adapters"],
    route_class=StrictJsonRoute,
)
gc_router = APIRouter(
    prefix="/admin/v1/adapters", tags=["admin: adapters"], route_class=StrictJsonRoute
)
_READ = errors(401, 403, 404, 503)


@router.post(
    "",
    status_code=201,
    openapi_extra={"requestBody": UPLOAD_BODY},
    responses=errors(401, 403, 404, 409, 503),
)
async def upload_adapter(
    tenant: str, request: Request, caller: AdapterWriteDep, svc: AdaptersDep
) -> VersionOut:
    """Multipart: ``name`` plus adapter_config.json + adapter_model.safetensors, or one
    .tar.gz/.zip. A new version of ``name`` on every upload."""
    with tempfile.TemporaryDirectory(prefix="lpx-upload-") as tmp:
        work = Path(tmp)
        upload = await read_upload(request, work, max_bytes=svc.limits.max_body_bytes, max_files=4)
        name = check_name(upload.fields.get("name", ""))
        request.state.audit_target = name
        adapter_dir = await asyncio.to_thread(stage, upload.files, work / "adapter", svc.limits)
        info = await svc.registry.publish(caller.tenant_id, name, adapter_dir, actor=caller.actor)
    return VersionOut.of(info)


@router.get("", responses=_READ)
async def list_adapters(tenant: str, caller: AdapterReadDep, svc: AdaptersDep) -> AdapterList:
    return AdapterList(data=[AdapterOut.of(a) for a in await svc.registry.list(caller.tenant_id)])


@router.get("/{name}", responses=_READ)
async def get_adapter(
    tenant: str, name: str, caller: AdapterReadDep, svc: AdaptersDep
) -> AdapterOut:
    return AdapterOut.of(await svc.registry.get(caller.tenant_id, name))


@router.delete("/{name}", responses=_READ)
async def delete_adapter(
    tenant: str, name: str, caller: AdapterWriteDep, svc: AdaptersDep
) -> Deleted:
    await svc.registry.delete(caller.tenant_id, name, actor=caller.actor)
    return Deleted(name=name)


@router.put("/{name}/aliases/{alias}", responses=errors(401, 403, 404, 409, 415, 503))
async def set_alias(
    tenant: str, name: str, alias: str, body: AliasIn, caller: AdapterWriteDep, svc: AdaptersDep
) -> AliasOut:
    info = await svc.registry.set_alias(
        caller.tenant_id, alias, name, body.version, actor=caller.actor
    )
    return AliasOut.of(info)


@router.delete("/{name}/aliases/{alias}", responses=_READ)
async def delete_alias(
    tenant: str, name: str, alias: str, caller: AdapterWriteDep, svc: AdaptersDep
) -> Deleted:
    await svc.registry.delete_alias(caller.tenant_id, alias, actor=caller.actor)
    return Deleted(name=alias)


@gc_router.post("/gc", responses=errors(401, 403, 415, 503))
async def collect_adapter_garbage(_: AdminDep, svc: AdaptersDep, body: GcIn) -> GcOut:
    """Delete stored bundles no ready version uses, older than ``grace_s`` (admin only)."""
    report = await collect_garbage(
        svc.registry.sessions, svc.store, grace=timedelta(seconds=body.grace_s)
    )
    return GcOut(**dataclasses.asdict(report))
