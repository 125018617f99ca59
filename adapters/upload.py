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

    Accepts exactly the two PEFT files (and a README.md beside them, which is dropped), or
    exactly one archive; refuses pickles by name.
    """
    if not files:
        raise InvalidAdapter(
            "no files: send adapter_config.json and adapter_model.safetensors, or one .tar.gz/.zip",
            param="files",
        )
    # the model card save_pretrained writes beside the two files (the CLI skips it too)
    files = [f for f in files if Path(f.filename).name not in IGNORED] or files
    for f in files:
        if Path(f.filename).suffix.lower() in PICKLE_SUFFIXES:
            raise InvalidAdapter(_pickle_message(f), param="files")
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


IGNORED = frozenset({"README.md"})
# What torch.save writes: a zip (since torch 1.6), or a bare pickle (protocol 2+).
_PICKLE_HEADS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _pickle_message(f: UploadedFile) -> str:
    """Why a ``.bin``/``.pt``/``.pth``/``.pkl`` file is refused, by what it holds."""
    with f.path.open("rb") as fh:
        head = fh.read(4)
    if head.startswith(_PICKLE_HEADS):
        return (
            f"{f.filename!r} is a pickled checkpoint (torch.save): pickles can run code when "
            "loaded and are refused; save the adapter with safetensors "
            "(save_pretrained(..., safe_serialization=True))"
        )
    return (
        f"{f.filename!r} is not an adapter file (weights are accepted only as "
        f"{WEIGHTS_FILE}; a {Path(f.filename).suffix} file is refused, as PEFT writes "
        f"pickled weights there): send {CONFIG_FILE} and {WEIGHTS_FILE}, or one .tar.gz/.zip"
    )


def _looks_like_archive(f: UploadedFile) -> bool:
    lower = f.filename.lower()
    if lower.endswith((".tar.gz", ".tgz", ".tar", ".zip")):
        return True
    if Path(f.filename).name in (CONFIG_FILE, WEIGHTS_FILE):
        return False
    with f.path.open("rb") as fh:
        return is_archive(fh.read(512))
