"""The stored form of one adapter version: a deterministic tar of the two PEFT files.

Its sha256 names the object (content addressing) and keys the engine's caches, so the same
weights and config uploaded twice are one object and one key; any change is a new key.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.archive import extract_adapter
from loraplex.adapters.validate import CONFIG_FILE, WEIGHTS_FILE


@dataclass(frozen=True)
class Bundle:
    path: Path
    sha256: str
    size: int


def pack(src_dir: Path, out: Path) -> Bundle:
    """Write ``out`` (uncompressed ustar, fixed order and metadata) and hash it."""
    with tarfile.open(out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            info = tarfile.TarInfo(name)
            info.size = (src_dir / name).stat().st_size
            info.mode, info.mtime, info.uid, info.gid = 0o644, 0, 0, 0
            with (src_dir / name).open("rb") as f:
                tf.addfile(info, f)
    digest = hashlib.sha256()
    with out.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return Bundle(path=out, sha256=digest.hexdigest(), size=out.stat().st_size)


def unpack(bundle: Path, dest: Path, *, max_bytes: int) -> None:
    """Unpack a stored bundle into ``dest`` (with the same checks as any archive)."""
    extract_adapter(bundle, dest, max_members=4, max_bytes=max_bytes)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
