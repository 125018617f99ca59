"""Admin API bodies for adapters. Requests forbid unknown fields."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from adapters.values import AdapterInfo, AliasInfo, VersionInfo


class VersionOut(BaseModel):
    name: str
    version: int
    sha256: str
    rank: int
    alpha: float
    target_modules: list[str]
    bytes: int
    base_model: str
    created_at: datetime

    @classmethod
    def of(cls, v: VersionInfo) -> VersionOut:
        return cls(
            name=v.name,
            version=v.version,
            sha256=v.sha256,
            rank=v.rank,
            alpha=v.alpha,
            target_modules=list(v.target_modules),
            bytes=v.bytes,
            base_model=v.base_model,
            created_at=v.created_at,
        )


class AdapterOut(BaseModel):
    name: str
    current_version: int | None
    created_at: datetime
    versions: list[VersionOut]
    aliases: dict[str, int]

    @classmethod
    def of(cls, a: AdapterInfo) -> AdapterOut:
        return cls(
            name=a.name,
            current_version=a.current_version,
            created_at=a.created_at,
            versions=[VersionOut.of(v) for v in a.versions],
            aliases=a.aliases,
        )


class AdapterList(BaseModel):
    data: list[AdapterOut]


class AliasIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)


class AliasOut(BaseModel):
    alias: str
    name: str
    version: int

    @classmethod
    def of(cls, a: AliasInfo) -> AliasOut:
        return cls(alias=a.alias, name=a.name, version=a.version)


class Deleted(BaseModel):
    name: str
    deleted: bool = True


class GcIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_s: float = Field(default=3600.0, ge=0)  # spares uploads still committing


class GcOut(BaseModel):
    deleted_objects: int
    deleted_bytes: int
    aborted_uploads: int
