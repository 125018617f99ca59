"""A tenant's API keys: issue (secret shown once), list, revoke, rotate."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from loraplex.admin.auth import KeysReadDep, ManageKeysDep
from loraplex.admin.schemas import IssuedKeyOut, KeyCreate, KeyList, KeyOut
from loraplex.gateway.deps import AuthDep, SessionDep
from loraplex.gateway.json_body import StrictJsonRoute
from loraplex.gateway.openapi import errors
from loraplex.tenancy import api_keys
from loraplex.tenancy.api_keys import IssuedKey

router = APIRouter(
    prefix="/admin/v1/tenants/{name}/keys", tags=["admin: keys"], route_class=StrictJsonRoute
)


def _issued(issued: IssuedKey, tenant: str) -> IssuedKeyOut:
    return IssuedKeyOut(**KeyOut.of(issued.row, tenant).model_dump(), key=issued.key)


@router.post("", status_code=201, responses=errors(401, 403, 404, 415, 503))
async def create_key(
    name: str, body: KeyCreate, admin: ManageKeysDep, auth: AuthDep, session: SessionDep
) -> IssuedKeyOut:
    issued = await api_keys.create_key(
        session,
        name,
        secret_key=auth.secret_key,
        actor=admin.audit_actor,
        scopes=body.scopes,
        expires_at=body.expires_at,
        name=body.name,
        limits=body.limits,
    )
    return _issued(issued, name)


@router.get("", responses=errors(401, 403, 404, 503))
async def list_keys(name: str, _: KeysReadDep, session: SessionDep) -> KeyList:
    return KeyList(data=[KeyOut.of(k, name) for k in await api_keys.list_keys(session, name)])


@router.delete("/{key_id}", responses=errors(401, 403, 404, 503))
async def revoke_key(
    name: str, key_id: uuid.UUID, admin: ManageKeysDep, auth: AuthDep, session: SessionDep
) -> KeyOut:
    row = await api_keys.revoke_key(session, name, key_id, actor=admin.audit_actor)
    auth.forget(row.prefix)  # this replica at once; the others within the cache TTL
    return KeyOut.of(row, name)


@router.post("/{key_id}/rotate", status_code=201, responses=errors(401, 403, 404, 503))
async def rotate_key(
    name: str, key_id: uuid.UUID, admin: ManageKeysDep, auth: AuthDep, session: SessionDep
) -> IssuedKeyOut:
    issued = await api_keys.rotate_key(
        session, name, key_id, secret_key=auth.secret_key, actor=admin.audit_actor
    )
    if issued.replaced_prefix is not None:
        auth.forget(issued.replaced_prefix)
    return _issued(issued, name)
