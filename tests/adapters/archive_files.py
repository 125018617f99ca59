"""Archives for upload tests: good ones and the classic attacks."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path


def tar_gz(out: Path, members: dict[str, bytes], *, prefix: str = "") -> Path:
    with tarfile.open(out, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out


def tar_with_link(out: Path, members: dict[str, bytes], link: str, target: str) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(link)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        tf.addfile(info)
    return out


def zip_file(out: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out


def zip_bomb(out: Path, config: bytes, expanded: int) -> Path:
    """A small zip whose safetensors member inflates to ``expanded`` zero bytes."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", config)
        with zf.open("adapter_model.safetensors", "w", force_zip64=True) as f:
            chunk = b"\0" * (1 << 20)
            for _ in range(expanded // len(chunk)):
                f.write(chunk)
    return out


def peft_members(directory: Path) -> dict[str, bytes]:
    return {
        "adapter_config.json": (directory / "adapter_config.json").read_bytes(),
        "adapter_model.safetensors": (directory / "adapter_model.safetensors").read_bytes(),
    }
