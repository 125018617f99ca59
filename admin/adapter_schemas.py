"""Admin API bodies for adapters. Requests forbid unknown fields; numbers are strict."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from loraplex.adapters.names import NAME_RE
from loraplex.adapters.values import AdapterInfo, AliasInfo, VersionInfo
from loraplex.admin.schemas import UtcTime

# The upload is read by hand (streamed to disk under its own cap), so its body is stated
# here: ``name`` and up to 4 file parts (any field name), either adapter_config.json +
# adapter_model.safetensors, or one .tar.gz / .zip holding them.
UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["name", "files"],
                "properties": {
                    "name": {"type": "string", "pattern": NAME_RE.pattern.replace("\\Z", "$")},
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "minItems": 1,
                        "maxItems": 4,
                    },
                },
            }
        }
    },
}


class VersionOut(BaseModel):
    name: str
    version: int
    sha256: str
    rank: int
    alpha: float
    target_modules: list[str]
    bytes: int
    base_model: str
    created_at: UtcTime

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
    created_at: UtcTime
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
    version: int = Field(strict=True, ge=1)


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
    # spares uploads still committing; at most about 31 years
    grace_s: float = Field(default=3600.0, strict=True, ge=0, le=1e9, allow_inf_nan=False)


class GcOut(BaseModel):
    deleted_objects: int
    deleted_bytes: int
    aborted_uploads: int
