"""``/ready`` reports the database, the object store and the engine, each on its own."""

from __future__ import annotations

from pathlib import Path

import httpx
from harness.cli import SECRET

from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings


async def ready(settings: GatewaySettings) -> tuple[int, dict[str, str]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/health")).status_code == 200
            r = await client.get("/ready")
    return r.status_code, r.json()["checks"]


async def test_control_plane_only_is_not_ready(sqlite_url: str, tmp_path: Path) -> None:
    settings = GatewaySettings(
        database_url=sqlite_url, secret_key=SECRET, data_dir=tmp_path, migrate_on_start=False
    )
    status, checks = await ready(settings)
    assert status == 503
    assert checks == {"database": "ok", "object_store": "ok", "engine": "not configured"}


async def test_s3_object_store(pg_url: str, s3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = GatewaySettings(
        database_url=pg_url,
        secret_key=SECRET,
        data_dir=tmp_path,
        object_store_url=f"s3://{s3.bucket}/adapters",
        s3_endpoint_url=s3.endpoint_url,
    )
    _, checks = await ready(settings)
    assert checks["database"] == "ok" and checks["object_store"] == "ok"

    missing = settings.model_copy(update={"object_store_url": "s3://lpx-no-such-bucket/x"})
    status, checks = await ready(missing)
    assert status == 503 and checks["object_store"].startswith("error")


async def test_unreachable_database(tmp_path: Path, free_port: int) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port}/x"
    settings = GatewaySettings(database_url=url, secret_key=SECRET, data_dir=tmp_path)
    status, checks = await ready(settings)
    assert status == 503 and checks["database"].startswith("error")
