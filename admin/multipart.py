"""Read a multipart upload to disk under a byte cap (413 past it), never whole in memory.

Starlette spools each file part (in memory up to 1 MiB, then a temp file); the receive
channel is wrapped so the request stops being read the moment the cap is passed.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive

from loraplex.adapters.errors import InvalidAdapter, UploadTooLarge
from loraplex.adapters.upload import UploadedFile


@dataclass(frozen=True)
class Upload:
    fields: dict[str, str]
    files: list[UploadedFile]


class _TooLarge(Exception):
    pass


def _too_large(max_bytes: int) -> UploadTooLarge:
    return UploadTooLarge(f"upload exceeds {max_bytes} bytes", param="files")


def _capped(receive: Receive, max_bytes: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise _TooLarge
        return message

    return wrapped


async def read_upload(request: Request, work: Path, *, max_bytes: int, max_files: int) -> Upload:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidAdapter("send the adapter as multipart/form-data", param="content-type")
    capped = Request(request.scope, receive=_capped(request.receive, max_bytes))
    try:
        form = await capped.form(max_files=max_files, max_fields=8, max_part_size=64 * 1024)
    except _TooLarge:
        raise _too_large(max_bytes) from None
    except HTTPException as exc:  # malformed multipart, too many parts
        raise InvalidAdapter(f"bad multipart body: {exc.detail}", param="files") from None
    try:
        fields: dict[str, str] = {}
        files: list[UploadedFile] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                path = work / f"part-{len(files)}"
                await asyncio.to_thread(_save, value, path)
                files.append(UploadedFile(filename=value.filename or key, path=path))
            else:
                fields[key] = value
        return Upload(fields=fields, files=files)
    finally:
        await form.close()


def _save(upload: UploadFile, path: Path) -> None:
    upload.file.seek(0)
    with path.open("wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)
