"""Usage export formats: CSV and JSON lines streamed chunk by chunk, Parquet built in a
file (row groups of ``PARQUET_BATCH`` rows) and then streamed. Same rows, same totals.

Output is deterministic for a given ledger: rows in ``started_at, request_id`` order,
timestamps in UTC ISO 8601 (``...Z``), no creation time written anywhere, so an export
rerun over unchanged data produces the same bytes (the daily S3 export relies on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.tenancy.usage_service import Granularity, UsageQuery, columns, stream_usage

Format = Literal["csv", "jsonl", "parquet"]
FORMATS: tuple[Format, ...] = ("csv", "jsonl", "parquet")
MEDIA_TYPES: dict[Format, str] = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}
CHUNK_BYTES = 64 * 1024
PARQUET_BATCH = 10_000

_TS = pa.timestamp("us", tz="UTC")
_REQUEST_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("tenant", pa.string()),
        ("tenant_id", pa.string()),
        ("api_key_id", pa.string()),
        ("adapter_version_id", pa.string()),
        ("adapter", pa.string()),
        ("adapter_version", pa.int64()),
        ("model", pa.string()),
        ("status", pa.string()),
        ("started_at", _TS),
        ("finished_at", _TS),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("cost_micros", pa.int64()),
        ("ttft_ms", pa.int64()),
        ("duration_ms", pa.int64()),
    ]
)
_BUCKET_SCHEMA = pa.schema(
    [
        ("period_start", _TS),
        ("tenant", pa.string()),
        ("tenant_id", pa.string()),
        ("adapter", pa.string()),
        ("model", pa.string()),
        ("requests", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("cost_micros", pa.int64()),
    ]
)


def schema(granularity: Granularity) -> pa.Schema:
    return _REQUEST_SCHEMA if granularity == "request" else _BUCKET_SCHEMA


def _text(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


async def csv_chunks(
    rows: AsyncIterator[dict[str, Any]], cols: Sequence[str]
) -> AsyncIterator[bytes]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    async for row in rows:
        writer.writerow(["" if row[c] is None else _text(row[c]) for c in cols])
        if buf.tell() >= CHUNK_BYTES:
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue().encode()


async def jsonl_chunks(
    rows: AsyncIterator[dict[str, Any]], cols: Sequence[str]
) -> AsyncIterator[bytes]:
    parts: list[str] = []
    size = 0
    async for row in rows:
        line = json.dumps({c: _text(row[c]) for c in cols}, separators=(",", ":")) + "\n"
        parts.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            yield "".join(parts).encode()
            parts, size = [], 0
    if parts:
        yield "".join(parts).encode()


async def write_parquet(
    rows: AsyncIterator[dict[str, Any]], granularity: Granularity, path: Path
) -> int:
    """Writes the rows to ``path``; returns how many. File writes run in a thread."""
    sch = schema(granularity)
    cols = columns(granularity)
    writer = await asyncio.to_thread(pq.ParquetWriter, str(path), sch, compression="zstd")
    count = 0
    try:
        batch: list[dict[str, Any]] = []
        async for row in rows:
            batch.append(row)
            if len(batch) >= PARQUET_BATCH:
                await asyncio.to_thread(_write_batch, writer, batch, cols, sch)
                count += len(batch)
                batch = []
        if batch:
            await asyncio.to_thread(_write_batch, writer, batch, cols, sch)
            count += len(batch)
    finally:
        await asyncio.to_thread(writer.close)
    return count


def _write_batch(
    writer: pq.ParquetWriter, batch: list[dict[str, Any]], cols: Sequence[str], sch: pa.Schema
) -> None:
    arrays = {c: [row[c] for row in batch] for c in cols}
    writer.write_table(pa.Table.from_pydict(arrays, schema=sch))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def file_chunks(path: Path, *, remove: bool = True) -> AsyncIterator[bytes]:
    """Stream a file in 1 MiB chunks; delete it afterwards (also if the client leaves)."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, 1024 * 1024):
            yield chunk
    finally:
        f.close()
        if remove:
            _remove(path)


async def open_export(
    sessions: async_sessionmaker[AsyncSession], query: UsageQuery, fmt: Format
) -> AsyncIterator[bytes]:
    """The export's bytes. Parquet is fully built before this returns (so a failure is an
    error response, not a cut-off file); CSV and JSON lines stream from the database, their
    first chunk read before this returns (a database that is down is an error response,
    not a 200 cut off after its headers)."""
    if fmt == "parquet":
        fd, name = tempfile.mkstemp(prefix="usage-", suffix=".parquet")
        os.close(fd)
        path = Path(name)
        try:
            async with sessions() as session:
                await write_parquet(stream_usage(session, query), query.granularity, path)
        except BaseException:
            _remove(path)
            raise
        return file_chunks(path)
    stream = _streamed(sessions, query, fmt)
    return _chain(await anext(stream, b""), stream)


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


async def _streamed(
    sessions: async_sessionmaker[AsyncSession], query: UsageQuery, fmt: Format
) -> AsyncIterator[bytes]:
    chunks = csv_chunks if fmt == "csv" else jsonl_chunks
    async with sessions() as session:
        async for chunk in chunks(stream_usage(session, query), columns(query.granularity)):
            yield chunk
