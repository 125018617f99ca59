"""`loraplex export-usage [--date YYYY-MM-DD]`: the daily usage export, run by hand.

Writes ``exports/dt=YYYY-MM-DD/usage.parquet`` to the export target (LORAPLEX_USAGE_EXPORT_URL,
else the object store) and prints where it is, whole. Without ``--date`` it exports today
(UTC) so far: what a new install has. Rerunning writes the same key, with the same bytes for
a day that is over.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated

import typer

from loraplex.adapters.service import s3_options
from loraplex.adapters.storage import LocalStore, ObjectStore, S3Store, StoreError, open_store
from loraplex.admin.daily_export import ExportResult, export_day
from loraplex.errors import config_errors, fail
from loraplex.gateway.settings import GatewaySettings
from loraplex.serve import load_settings
from loraplex.tenancy.db import make_engine, make_sessionmaker


def export_usage(
    day: Annotated[
        str | None,
        typer.Option(
            "--date",
            help="The UTC day to export, YYYY-MM-DD (default: today so far; the daily "
            "export writes each day again once it is over).",
        ),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(help="s3://bucket/prefix or file:///dir (default: the export target)."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Embedded-mode data directory (LORAPLEX_DATA_DIR).")
    ] = None,
) -> None:
    """Export one day's usage records (all tenants, one row per request) as Parquet."""
    settings = load_settings(data_dir=data_dir, usage_export_url=to)
    if day is None:
        when = datetime.now(UTC).date()
    else:
        try:
            when = date.fromisoformat(day)
        except ValueError:
            fail("--date", f"expected YYYY-MM-DD, got {day!r}")
    with config_errors():
        try:
            url = settings.usage_export_url or settings.resolved_object_store_url()
            store = open_store(url, endpoint_url=settings.s3_endpoint_url, s3=s3_options(settings))
            result = asyncio.run(_run(settings, store, when))
        except StoreError as exc:
            fail("LORAPLEX_USAGE_EXPORT_URL", str(exc))
    typer.echo(f"{where(store, result.key)}: {result.rows} rows, sha256 {result.sha256}")


def where(store: ObjectStore, key: str) -> str:
    """The whole location of ``key``: an absolute path, or ``s3://bucket/prefix/key``."""
    if isinstance(store, LocalStore):
        return str((store.root / key).resolve())
    if isinstance(store, S3Store):
        return f"s3://{store.bucket}/{store._key(key)}"
    return key


async def _run(settings: GatewaySettings, store: ObjectStore, day: date) -> ExportResult:
    engine = make_engine(settings.resolved_database_url(), settings.db_timeouts())
    try:
        return await export_day(make_sessionmaker(engine), store, day)
    finally:
        await engine.dispose()
