"""Usage export: every format and granularity sums to the ledger's totals, exactly; the
daily S3 export is idempotent (same key, same bytes on rerun)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime, timedelta

import pyarrow.parquet as pq
import pytest
from billing_helpers import T0, event, make_tenant
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.adapters.storage import LocalStore, S3Store
from loraplex.admin.daily_export import DailyExporter, export_day, export_key
from loraplex.tenancy.usage_export import FORMATS, open_export
from loraplex.tenancy.usage_service import (
    GRANULARITIES,
    UsageQuery,
    UsageTotals,
    insert_usage,
    usage_totals,
)

SUMMED = ("prompt_tokens", "completion_tokens", "cached_tokens", "cost_micros")


async def seed(sessions: async_sessionmaker[AsyncSession]) -> tuple:
    """Two tenants, 400 requests over about two days (7 and 11 minute spacing)."""
    a = await make_tenant(sessions, "acme")
    b = await make_tenant(sessions, "globex")
    events = [event(a, i) for i in range(250)]
    events += [
        event(b, i, step=timedelta(minutes=11), prices=(1_000_000, 3_000_000)) for i in range(150)
    ]
    async with sessions() as s:
        assert await insert_usage(s, events) == 400
        assert await insert_usage(s, events[:10]) == 0  # redelivery: nothing new
        await s.commit()
    return a, b, events


def parse(data: bytes, fmt: str) -> list[dict]:
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(data.decode())))
    if fmt == "jsonl":
        return [json.loads(line) for line in data.decode().splitlines()]
    return pq.read_table(io.BytesIO(data)).to_pylist()


def totals(rows: list[dict], granularity: str) -> UsageTotals:
    requests = len(rows) if granularity == "request" else sum(int(r["requests"]) for r in rows)
    sums = [sum(int(r[name]) for r in rows) for name in SUMMED]
    return UsageTotals(requests, *sums)


async def export_bytes(sessions, query: UsageQuery, fmt: str) -> bytes:
    return b"".join([chunk async for chunk in await open_export(sessions, query, fmt)])


@pytest.mark.parametrize("fmt", FORMATS)
async def test_every_format_and_granularity_reconciles_with_the_ledger(sessions, fmt):
    a, b, events = await seed(sessions)
    start, end = T0 + timedelta(hours=3), T0 + timedelta(days=1, hours=5)  # partial days
    for tenant in (None, a, b):
        async with sessions() as s:
            expected = await usage_totals(s, start, end, tenant)
        in_range = [
            e
            for e in events
            if start <= e.started_at < end and (tenant is None or e.tenant_id == tenant)
        ]
        assert expected.requests == len(in_range) > 0
        assert expected.cost_micros == sum(e.cost_micros for e in in_range)
        for granularity in GRANULARITIES:
            query = UsageQuery(start, end, tenant, granularity)
            rows = parse(await export_bytes(sessions, query, fmt), fmt)
            assert totals(rows, granularity) == expected, (tenant, granularity)


async def test_buckets_are_per_period_tenant_and_model(sessions):
    a, _, _ = await seed(sessions)
    query = UsageQuery(T0, T0 + timedelta(days=2), a, "hour")
    rows = parse(await export_bytes(sessions, query, "jsonl"), "jsonl")
    keys = [(r["period_start"], r["model"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert rows[0]["period_start"] == "2026-11-23T00:00:00Z" and rows[0]["tenant"] == "acme"
    day = parse(
        await export_bytes(sessions, UsageQuery(T0, T0 + timedelta(days=2), a, "day"), "csv"), "csv"
    )
    assert [(r["period_start"][:10], r["model"]) for r in day] == [
        ("2026-11-23", "base"),
        ("2026-11-23", "support@3"),
        ("2026-11-24", "base"),
        ("2026-11-24", "support@3"),
    ]


async def test_request_rows_carry_the_ledger_fields(sessions):
    a, _, events = await seed(sessions)
    query = UsageQuery(T0, T0 + timedelta(minutes=5), a, "request")
    (csv_row,) = parse(await export_bytes(sessions, query, "csv"), "csv")
    (pq_row,) = parse(await export_bytes(sessions, query, "parquet"), "parquet")
    first = events[0]
    assert csv_row["request_id"] == pq_row["request_id"] == first.request_id
    assert csv_row["started_at"] == "2026-11-23T00:00:00Z"
    assert pq_row["started_at"] == first.started_at
    assert csv_row["api_key_id"] == "" and pq_row["api_key_id"] is None
    assert (
        int(csv_row["completion_tokens"]) == pq_row["completion_tokens"] == first.completion_tokens
    )


async def test_empty_range_exports_headers_only(sessions):
    await seed(sessions)
    query = UsageQuery(T0 - timedelta(days=9), T0 - timedelta(days=8))
    assert parse(await export_bytes(sessions, query, "csv"), "csv") == []
    assert await export_bytes(sessions, query, "jsonl") == b""
    assert pq.read_table(io.BytesIO(await export_bytes(sessions, query, "parquet"))).num_rows == 0


async def test_daily_s3_export_is_idempotent(sessions, s3, tmp_path):
    await seed(sessions)
    store = S3Store(s3.bucket, "lpx", endpoint_url=s3.endpoint_url)
    day = date(2026, 11, 23)
    first = await export_day(sessions, store, day)
    client = s3.client()
    key = f"lpx/{export_key(day)}"
    assert key == "lpx/exports/dt=2026-11-23/usage.parquet"
    body = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    again = await export_day(sessions, store, day)
    assert again == first
    assert client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == body
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix="lpx/exports/")["Contents"]
    assert [o["Key"] for o in listed] == [key]
    start = datetime(2026, 11, 23, tzinfo=UTC)
    async with sessions() as s:
        expected = await usage_totals(s, start, start + timedelta(days=1))
    assert totals(parse(body, "parquet"), "request") == expected
    assert first.rows == expected.requests


async def test_daily_exporter_runs_yesterday_once_after_the_hour(sessions, tmp_path):
    await seed(sessions)
    now = datetime(2026, 11, 24, 0, 30, tzinfo=UTC)
    outcomes: list[str] = []
    exporter = DailyExporter(
        sessions,
        LocalStore(tmp_path / "objects"),
        after_hour_utc=1,
        record=outcomes.append,
        now=lambda: now,
    )
    assert await exporter.run_once() is None  # 00:30: the ledger may still be catching up
    now = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
    result = await exporter.run_once()
    assert result is not None and result.day == date(2026, 11, 23)
    assert (tmp_path / "objects" / export_key(date(2026, 11, 23))).exists()
    assert await exporter.run_once() is None  # done for today
    assert outcomes == ["ok"]


async def test_daily_exporter_waits_for_a_lagging_ledger(sessions, tmp_path):
    await seed(sessions)
    behind = [True]

    async def ledger_behind() -> bool:
        return behind[0]

    outcomes: list[str] = []
    exporter = DailyExporter(
        sessions,
        LocalStore(tmp_path / "objects"),
        record=outcomes.append,
        now=lambda: datetime(2026, 11, 24, 2, 0, tzinfo=UTC),
        ledger_behind=ledger_behind,
    )
    assert await exporter.run_once() is None
    behind[0] = False
    assert (await exporter.run_once()) is not None
    assert outcomes == ["postponed", "ok"]


async def test_cli_export_usage_reruns_to_the_same_object(sessions, pg_url, s3):
    import asyncio
    import os
    import secrets
    import sys
    from pathlib import Path

    await seed(sessions)
    env = {
        **os.environ,
        "LORAPLEX_DATABASE_URL": pg_url,
        "LORAPLEX_SECRET_KEY": secrets.token_hex(32),
        "LORAPLEX_S3_ENDPOINT_URL": s3.endpoint_url,
    }
    argv = [
        str(Path(sys.executable).parent / "loraplex"),
        "export-usage",
        "--date",
        "2026-11-24",
        "--to",
        f"s3://{s3.bucket}/billing",
    ]

    async def run() -> str:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode().strip()

    first, second = await run(), await run()
    assert first == second and first.startswith(
        f"s3://{s3.bucket}/billing/exports/dt=2026-11-24/usage.parquet: "
    )
    key = "billing/exports/dt=2026-11-24/usage.parquet"
    body = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    start = datetime(2026, 11, 24, tzinfo=UTC)
    async with sessions() as s:
        expected = await usage_totals(s, start, start + timedelta(days=1))
    assert totals(parse(body, "parquet"), "request") == expected
    assert f": {expected.requests} rows" in first


async def test_export_on_sqlite(sqlite_url):
    from loraplex.tenancy.db import make_engine, make_sessionmaker

    engine = make_engine(sqlite_url)
    try:
        lite = make_sessionmaker(engine)
        a, _, _ = await seed(lite)
        start, end = T0 + timedelta(hours=3), T0 + timedelta(days=1, hours=5)
        async with lite() as s:
            expected = await usage_totals(s, start, end, a)
        assert expected.requests > 0
        for fmt in FORMATS:
            for granularity in GRANULARITIES:
                query = UsageQuery(start, end, a, granularity)
                rows = parse(await export_bytes(lite, query, fmt), fmt)
                assert totals(rows, granularity) == expected, (fmt, granularity)
    finally:
        await engine.dispose()
