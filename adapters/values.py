"""The typed values the registry hands out (never ORM rows: those stay in their session)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from loraplex.tenancy.models import AdapterVersion


@dataclass(frozen=True)
class VersionInfo:
    id: uuid.UUID
    name: str
    version: int
    sha256: str
    storage_key: str
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    bytes: int
    status: str
    created_at: datetime

    @classmethod
    def of(cls, name: str, row: AdapterVersion) -> VersionInfo:
        return cls(
            id=row.id,
            name=name,
            version=row.version,
            sha256=row.sha256,
            storage_key=row.storage_key,
            base_model=row.base_model,
            rank=row.rank,
            alpha=row.alpha,
            target_modules=tuple(row.target_modules),
            bytes=row.bytes,
            status=row.status,
            created_at=row.created_at,
        )


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    current_version: int | None
    created_at: datetime
    versions: tuple[VersionInfo, ...]
    aliases: dict[str, int]  # alias -> version of this adapter


@dataclass(frozen=True)
class AliasInfo:
    alias: str
    name: str
    version: int


@dataclass(frozen=True)
class GcReport:
    deleted_objects: int
    deleted_bytes: int
    aborted_uploads: int
