"""Object storage for adapter bundles: S3 (boto3, any endpoint) or a local directory.

A ``put_file`` returns only once the object is durable, and an object is never visible
half-written: S3 exposes an object (single PUT or multipart) only when the upload
completes, and boto3 aborts a failed multipart upload; ``LocalStore`` writes a temp file,
fsyncs it and renames it into place. Methods are blocking: call them from a thread.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse


class StoreError(Exception):
    """The store failed or could not be reached. ``retry_after``: when its circuit breaker
    will let a call try again (None: not known)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ObjectMissing(StoreError):
    pass


@dataclass(frozen=True)
class S3Options:
    """Bounds of every S3 call. The read timeout applies to each socket read or write, not
    to a whole transfer: a large upload that keeps moving never times out."""

    connect_timeout_s: float = 2.0
    read_timeout_s: float = 5.0
    max_attempts: int = 2  # per call, the first included (botocore standard retries)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime


class ObjectStore(Protocol):
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, dest: Path) -> None: ...
    def delete(self, key: str) -> None: ...
    def list(self) -> Iterator[ObjectInfo]: ...
    def cleanup_incomplete(self, older_than: datetime) -> int: ...


def blob_key(sha256: str) -> str:
    return f"blobs/{sha256[:2]}/{sha256}.tar"


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        try:
            with path.open("rb") as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"local store: cannot write {key}: {exc}") from exc

    def get_file(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError:
            raise ObjectMissing(f"local store: no object {key}") from None
        except OSError as exc:
            raise StoreError(f"local store: cannot read {key}: {exc}") from exc

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self) -> Iterator[ObjectInfo]:
        for path in self.root.rglob("*"):
            if path.is_file() and self._tmp not in path.parents:
                st = path.stat()
                key = path.relative_to(self.root).as_posix()
                yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def cleanup_incomplete(self, older_than: datetime) -> int:
        n = 0
        for path in self._tmp.glob("*.part"):
            if datetime.fromtimestamp(path.stat().st_mtime, UTC) < older_than:
                path.unlink(missing_ok=True)
                n += 1
        return n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        multipart_threshold: int = 16 * 1024 * 1024,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_attempts: int = 2,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"total_max_attempts": max_attempts, "mode": "standard"},
            ),
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_threshold,
            max_concurrency=4,
            num_download_attempts=max_attempts,  # s3transfer's own retries of a body read
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path) -> None:
        try:
            self._client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer)
        except Exception as exc:  # boto3 raises many unrelated types; all mean "not stored"
            raise StoreError(f"s3: cannot upload {key}: {exc}") from exc

    def get_file(self, key: str, dest: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.download_file(self.bucket, self._key(key), str(dest),
                                       Config=self._transfer)  # fmt: skip
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey"}:
                raise ObjectMissing(f"s3: no object {key}") from None
            raise StoreError(f"s3: cannot download {key}: {exc}") from exc
        except Exception as exc:
            raise StoreError(f"s3: cannot download {key}: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise StoreError(f"s3: cannot delete {key}: {exc}") from exc

    def list(self) -> Iterator[ObjectInfo]:
        start = f"{self.prefix}/" if self.prefix else ""
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][len(start) :], obj["Size"], obj["LastModified"])
        except Exception as exc:
            raise StoreError(f"s3: cannot list: {exc}") from exc

    def cleanup_incomplete(self, older_than: datetime) -> int:
        """Abort multipart uploads a crashed writer left behind (invisible, but billed)."""
        start = f"{self.prefix}/" if self.prefix else ""
        try:
            found = self._client.list_multipart_uploads(Bucket=self.bucket, Prefix=start)
            n = 0
            for up in found.get("Uploads", []):
                if up["Initiated"] < older_than:
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                    )
                    n += 1
            return n
        except Exception as exc:
            raise StoreError(f"s3: cannot list multipart uploads: {exc}") from exc


def open_store(
    url: str, *, endpoint_url: str | None = None, s3: S3Options | None = None
) -> ObjectStore:
    """``s3://bucket/prefix`` or ``file:///dir``."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        o = s3 or S3Options()
        return S3Store(
            parsed.netloc,
            parsed.path,
            endpoint_url=endpoint_url,
            connect_timeout=o.connect_timeout_s,
            read_timeout=o.read_timeout_s,
            max_attempts=o.max_attempts,
        )
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    raise ValueError(f"unsupported object store URL {url!r}")
