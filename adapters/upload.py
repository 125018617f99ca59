"""Turn the files of one upload (two PEFT files, or one archive) into a staged adapter dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.archive import PICKLE_SUFFIXES, extract_adapter, is_archive
from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.validate import CONFIG_FILE, WEIGHTS_FILE


@dataclass(frozen=True)
class UploadLimits:
    max_rank: int = 64
    max_body_bytes: int = 1024 * 1024 * 1024  # the whole multipart request
    max_expanded_bytes: int = 2 * 1024 * 1024 * 1024  # an archive's contents
    max_archive_members: int = 64


@dataclass(frozen=True)
class UploadedFile:
    filename: str  # as the client named it (never used as a path)
    path: Path  # where the route spooled it


def stage(files: list[UploadedFile], dest: Path, limits: UploadLimits) -> Path:
    """Put ``adapter_config.json`` and ``adapter_model.safetensors`` into ``dest``.

    Accepts exactly the two PEFT files, or exactly one archive; refuses pickles by name.
    """
    if not files:
        raise InvalidAdapter(
            "no files: send adapter_config.json and adapter_model.safetensors, or one .tar.gz/.zip",
            param="files",
        )
    for f in files:
        if Path(f.filename).suffix.lower() in PICKLE_SUFFIXES:
            raise InvalidAdapter(
                f"{f.filename!r} is a pickled checkpoint: pickles can run code when loaded "
                "and are refused; save the adapter with safetensors "
                "(save_pretrained(..., safe_serialization=True))",
                param="files",
            )
    dest.mkdir(parents=True, exist_ok=True)
    if len(files) == 1 and _looks_like_archive(files[0]):
        extract_adapter(
            files[0].path,
            dest,
            max_members=limits.max_archive_members,
            max_bytes=limits.max_expanded_bytes,
        )
        return dest
    by_name: dict[str, Path] = {}
    for f in files:
        base = Path(f.filename).name
        if base not in (CONFIG_FILE, WEIGHTS_FILE):
            raise InvalidAdapter(
                f"unexpected file {f.filename!r}: send {CONFIG_FILE} and {WEIGHTS_FILE}, "
                "or one .tar.gz/.zip archive",
                param="files",
            )
        if base in by_name:
            raise InvalidAdapter(f"{base} sent more than once", param="files")
        by_name[base] = f.path
    for name, path in by_name.items():
        path.replace(dest / name)
    return dest


def _looks_like_archive(f: UploadedFile) -> bool:
    lower = f.filename.lower()
    if lower.endswith((".tar.gz", ".tgz", ".tar", ".zip")):
        return True
    if Path(f.filename).name in (CONFIG_FILE, WEIGHTS_FILE):
        return False
    with f.path.open("rb") as fh:
        return is_archive(fh.read(512))
