"""Unpack an uploaded ``.tar.gz`` / ``.tar`` / ``.zip`` into a staging dir, refusing anything unsafe.

Only the two PEFT files are written out (at the archive root or inside one top folder);
other harmless files are skipped. Refused by name: absolute or ``..`` paths, symbolic and
hard links, devices, more than ``max_members`` entries, declared or actual expanded size
over ``max_bytes`` (zip bombs: sizes are counted while decompressing, not trusted),
duplicate entries, and pickled weights.
"""

from __future__ import annotations

import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from loraplex.adapters.errors import InvalidAdapter, UnsafeArchive, UploadTooLarge
from loraplex.adapters.validate import CONFIG_FILE, WEIGHTS_FILE

WANTED = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def is_archive(head: bytes) -> bool:
    return head[:2] == b"\x1f\x8b" or head[:4] == b"PK\x03\x04" or head[257:262] == b"ustar"


def extract_adapter(archive: Path, dest: Path, *, max_members: int, max_bytes: int) -> None:
    with archive.open("rb") as f:
        head = f.read(512)
    if head[:4] == b"PK\x03\x04":
        _extract_zip(archive, dest, max_members, max_bytes)
    elif head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar":
        _extract_tar(archive, dest, max_members, max_bytes)
    else:
        raise InvalidAdapter("archive is neither .tar.gz, .tar nor .zip", param="archive")


def _check_name(name: str) -> str | None:
    """The member's target file name if it is one of the two wanted files, else None."""
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"archive member {name!r} has an absolute or Windows path")
    path = PurePosixPath(name)
    if ".." in path.parts:
        raise UnsafeArchive(f"archive member {name!r} escapes the archive (path traversal)")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidAdapter(
            f"archive member {name!r} is a pickled checkpoint: pickles can run code when "
            "loaded and are refused; upload adapter_model.safetensors",
            param="archive",
        )
    parts = [p for p in path.parts if p != "."]
    if parts and parts[-1] in WANTED and len(parts) <= 2:
        return parts[-1]
    return None


class _Budget:
    def __init__(self, max_members: int, max_bytes: int) -> None:
        self.members, self.declared, self.written = 0, 0, 0
        self.max_members, self.max_bytes = max_members, max_bytes
        self.found: set[str] = set()

    def member(self, name: str, declared: int) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise UnsafeArchive(f"archive has more than {self.max_members} members")
        self.declared += declared
        if self.declared > self.max_bytes:
            raise UploadTooLarge(
                f"archive expands to more than {self.max_bytes} bytes (zip bomb?)",
                param="archive",
            )

    def copy(self, src: IO[bytes], target: str, dest: Path) -> None:
        if target in self.found:
            raise UnsafeArchive(f"archive holds {target} more than once")
        self.found.add(target)
        with (dest / target).open("wb") as out:
            while chunk := src.read(1 << 20):
                self.written += len(chunk)
                if self.written > self.max_bytes:
                    raise UploadTooLarge(
                        f"archive expands to more than {self.max_bytes} bytes (zip bomb?)",
                        param="archive",
                    )
                out.write(chunk)


def _extract_tar(archive: Path, dest: Path, max_members: int, max_bytes: int) -> None:
    budget = _Budget(max_members, max_bytes)
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            for m in tf:  # streaming: headers are checked before the next data is read
                budget.member(m.name, m.size)
                target = _check_name(m.name)
                if m.issym() or m.islnk():
                    raise UnsafeArchive(f"archive member {m.name!r} is a link; links are refused")
                if not (m.isfile() or m.isdir()):
                    raise UnsafeArchive(f"archive member {m.name!r} is not a regular file")
                if target is not None and m.isfile():
                    src = tf.extractfile(m)
                    if src is None:
                        raise UnsafeArchive(f"archive member {m.name!r} cannot be read")
                    budget.copy(src, target, dest)
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise InvalidAdapter(f"archive is corrupt or truncated ({exc})", param="archive") from None


def _extract_zip(archive: Path, dest: Path, max_members: int, max_bytes: int) -> None:
    budget = _Budget(max_members, max_bytes)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                budget.member(info.filename, info.file_size)
                _check_name(info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise UnsafeArchive(f"archive member {info.filename!r} is a symbolic link")
            for info in infos:
                target = _check_name(info.filename)
                if target is not None and not info.is_dir():
                    with zf.open(info) as src:
                        budget.copy(src, target, dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError,
            EOFError, OSError) as exc:  # fmt: skip
        raise InvalidAdapter(f"archive is corrupt or truncated ({exc})", param="archive") from None
