"""The registry over real PostgreSQL and the moto S3 server: versions, aliases, delete, GC."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from adapter_files import TINY, write_lora
from moto_proc import MotoServer

from loraplex.adapters.errors import (
    AdapterConflict,
    AdapterNotFound,
    InvalidAdapter,
    StoreUnavailable,
)
from loraplex.adapters.gc import collect_garbage
from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.storage import S3Store


@pytest.fixture
def registry(sessions, moto: MotoServer, bucket: str) -> AdapterRegistry:  # type: ignore[no-untyped-def]
    store = S3Store(bucket, "lpx", endpoint_url=moto.url)
    return AdapterRegistry(sessions, store, lambda: TINY, max_rank=8)


def staged(tmp_path: Path, seed: int, rank: int = 2) -> Path:
    d = tmp_path / f"stage-{uuid.uuid4().hex[:6]}"
    write_lora(d, rank=rank, seed=seed)
    return d


async def test_versions_aliases_resolve(
    registry: AdapterRegistry, tenant_id: uuid.UUID, tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    v1 = await registry.publish(tenant_id, "support", staged(tmp_path, 1))
    v2 = await registry.publish(tenant_id, "support", staged(tmp_path, 2, rank=4))
    assert (v1.version, v2.version) == (1, 2) and v1.sha256 != v2.sha256
    assert v2.rank == 4 and v2.target_modules == ("q_proj", "v_proj")
    assert moto.keys(bucket) == sorted(f"lpx/{v.storage_key}" for v in (v1, v2))
    assert (await registry.resolve(tenant_id, "support")).version == 2  # type: ignore[union-attr]
    assert (await registry.resolve(tenant_id, "support@1")).sha256 == v1.sha256  # type: ignore[union-attr]
    assert await registry.resolve(tenant_id, "support@3") is None
    await registry.set_alias(tenant_id, "prod", "support", 1)
    assert (await registry.resolve(tenant_id, "prod")).version == 1  # type: ignore[union-attr]
    await registry.set_alias(tenant_id, "prod", "support", 2)  # move: new requests only
    assert (await registry.resolve(tenant_id, "prod")).version == 2  # type: ignore[union-attr]
    info = await registry.get(tenant_id, "support")
    assert info.current_version == 2 and info.aliases == {"prod": 2}
    with pytest.raises(AdapterNotFound):
        await registry.set_alias(tenant_id, "prod", "support", 9)
    with pytest.raises(AdapterConflict):
        await registry.set_alias(tenant_id, "support", "support", 1)
    with pytest.raises(AdapterConflict):
        await registry.publish(tenant_id, "prod", staged(tmp_path, 3))
    assert await registry.resolve(uuid.uuid4(), "support") is None  # other tenants see nothing


async def test_delete_stops_resolving_and_gc_collects(
    registry: AdapterRegistry, tenant_id: uuid.UUID, tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    v1 = await registry.publish(tenant_id, "gone", staged(tmp_path, 1))
    keep = await registry.publish(tenant_id, "kept", staged(tmp_path, 2))
    same = await registry.publish(tenant_id, "twin", staged(tmp_path, 1))  # same bytes as v1
    assert same.sha256 == v1.sha256 and len(moto.keys(bucket)) == 2  # content-addressed
    await registry.set_alias(tenant_id, "live", "gone", 1)
    await registry.delete(tenant_id, "gone")
    assert await registry.resolve(tenant_id, "gone") is None
    assert await registry.resolve(tenant_id, "gone@1") is None
    assert await registry.resolve(tenant_id, "live") is None  # its aliases went with it
    assert [a.name for a in await registry.list(tenant_id)] == ["kept", "twin"]
    report = await collect_garbage(registry.sessions, registry.store, grace=timedelta(0))
    assert report.deleted_objects == 0  # "twin" still needs the bytes
    await registry.delete(tenant_id, "twin")
    report = await collect_garbage(registry.sessions, registry.store, grace=timedelta(hours=1))
    assert report.deleted_objects == 0  # within the grace period
    report = await collect_garbage(registry.sessions, registry.store, grace=timedelta(0))
    assert report.deleted_objects == 1
    assert moto.keys(bucket) == [f"lpx/{keep.storage_key}"]
    again = await registry.publish(tenant_id, "gone", staged(tmp_path, 5))
    assert again.version == 2  # version numbers never come back


async def test_concurrent_uploads_get_distinct_versions(
    registry: AdapterRegistry, tenant_id: uuid.UUID, tmp_path: Path
) -> None:
    dirs = [staged(tmp_path, seed) for seed in range(6)]
    got = await asyncio.gather(*(registry.publish(tenant_id, "race", d) for d in dirs))
    assert sorted(v.version for v in got) == [1, 2, 3, 4, 5, 6]


async def test_invalid_or_unstorable_leaves_nothing(
    sessions, tenant_id: uuid.UUID, tmp_path: Path, moto: MotoServer, bucket: str
) -> None:  # type: ignore[no-untyped-def]
    registry = AdapterRegistry(
        sessions, S3Store(bucket, "lpx", endpoint_url=moto.url), lambda: TINY, max_rank=1
    )
    with pytest.raises(InvalidAdapter, match="maximum rank 1"):
        await registry.publish(tenant_id, "big", staged(tmp_path, 1, rank=2))
    down = AdapterRegistry(
        sessions,
        S3Store(bucket, "lpx", endpoint_url="http://127.0.0.1:9", connect_timeout=0.5),
        lambda: TINY,
        max_rank=8,
    )
    with pytest.raises(StoreUnavailable):
        await down.publish(tenant_id, "nostore", staged(tmp_path, 1))
    assert await registry.list(tenant_id) == [] and moto.keys(bucket) == []
    shutil.rmtree(tmp_path, ignore_errors=True)


async def test_gateway_model_cache_follows_the_registry(
    registry: AdapterRegistry, sessions, tenant_id: uuid.UUID, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The gateway's resolver remembers an answer for its TTL (no database round trip per
    adapter request); a change through the registry it watches applies to the next request
    at once, a change it does not see (another worker's) once the TTL has passed; a name
    that does not resolve is asked again each time."""
    from sqlalchemy import text

    from loraplex.gateway.resolve import ModelResolver
    from loraplex.tenancy.errors import ModelNotFound
    from loraplex.tenancy.principal import Principal

    class Clock:
        now = 100.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    resolver = ModelResolver(sessions, stale_s=60, ttl_s=5, clock=clock)
    registry.on_change.append(resolver.forget_tenant)
    who = Principal(tenant_id=tenant_id, tenant_name="t", key_id=None, scopes=frozenset())

    async def version(model: str) -> int:
        target = await resolver.resolve(who, model, base_model="base")
        assert target.version is not None
        return target.version.version

    with pytest.raises(ModelNotFound):
        await version("support")
    await registry.publish(tenant_id, "support", staged(tmp_path, 1))
    assert await version("support") == 1  # not-found was not remembered
    await registry.publish(tenant_id, "support", staged(tmp_path, 2))
    assert await version("support") == 2  # this process's upload: at once
    await registry.set_alias(tenant_id, "prod", "support", 1)
    assert await version("prod") == 1
    await registry.set_alias(tenant_id, "prod", "support", 2)
    assert await version("prod") == 2  # the move, at once

    # another worker moves the alias back (straight in the database: this one hears nothing)
    async with sessions() as s, s.begin():
        await s.execute(
            text(
                "UPDATE adapter_aliases SET adapter_version_id = (SELECT v.id FROM "
                "adapter_versions v JOIN adapters a ON a.id = v.adapter_id WHERE "
                "a.name = 'support' AND v.version = 1) WHERE alias = 'prod'"
            )
        )
    assert await version("prod") == 2  # remembered: no database round trip
    clock.now += 5.1
    assert await version("prod") == 1  # past the TTL: asked again

    await registry.delete(tenant_id, "support")
    with pytest.raises(ModelNotFound):
        await version("support")
