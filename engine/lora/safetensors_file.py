"""A ``.safetensors`` file as one memory map: the header checked, each tensor a view.

Layout: 8 bytes little-endian u64 ``N``, ``N`` bytes of JSON
``{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then
the data. Offsets are relative to the data start and must tile it exactly; each tensor's
byte length must equal ``prod(shape) * itemsize`` (the checks ``safetensors`` makes).

The format is built for mmap: the data is mapped, not read, and :func:`tensor_views` returns
every tensor as a view of the mapping, so the one copy an adapter load makes is the copy
into its packed (pinned) buffer. (``safetensors.torch.load_file`` copies every tensor out
of its own mapping first.) Any problem raises :class:`SafetensorsError`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class SafetensorsError(ValueError):
    pass


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data region
    end: int


@dataclass
class SafetensorsFile:
    entries: list[TensorEntry]  # in offset order
    data: torch.Tensor  # uint8 view of the data region (a memory map)

    def flat_views(self) -> dict[str, torch.Tensor] | None:
        """Every tensor as a 1-D view of the mapping, made by one ``split`` (one call, not
        a few per tensor). None when the tensors' dtypes differ or the data is unaligned."""
        if not self.entries or len({e.dtype for e in self.entries}) != 1:
            return None
        dtype = self.entries[0].dtype
        if self.data.storage_offset() % dtype.itemsize:
            return None
        sizes = [(e.end - e.begin) // dtype.itemsize for e in self.entries]
        parts = self.data.view(dtype).split(sizes)
        return {e.name: t for e, t in zip(self.entries, parts, strict=True)}

    def view(self, e: TensorEntry) -> torch.Tensor:
        """One tensor, as a view of the mapping when aligned (else a copy of its bytes)."""
        raw = self.data[e.begin : e.end]
        if e.begin % e.dtype.itemsize:
            raw = raw.clone()
        return raw.view(e.dtype).view(e.shape)


def open_safetensors(path: Path) -> SafetensorsFile:
    """Map ``path`` and check its header; the tensors' bytes are not touched."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{size} bytes is too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(f"header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError("header is not a JSON object")
        header.pop("__metadata__", None)
        data_len = size - 8 - n
        entries = sorted((_entry(k, v) for k, v in header.items()), key=lambda e: e.begin)
        pos = 0
        for e in entries:
            if e.begin != pos:
                raise SafetensorsError("data_offsets overlap or leave gaps")
            pos = e.end
        if pos != data_len:
            raise SafetensorsError(f"the data holds {data_len} bytes, the header {pos}")
        if data_len == 0:
            return SafetensorsFile(entries, torch.empty(0, dtype=torch.uint8))
        # Private and writable only so torch takes it without a warning; never written, so
        # no page is copied (MAP_POPULATE would copy them all: it prefaults for writing).
        mm = mmap.mmap(
            f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            mm.madvise(mmap.MADV_WILLNEED)  # read ahead now when it is not in the page cache
    data = torch.frombuffer(mm, dtype=torch.uint8, offset=8 + n, count=data_len)
    return SafetensorsFile(entries, data)


def _entry(name: str, entry: object) -> TensorEntry:
    if not isinstance(entry, dict):
        raise SafetensorsError(f"tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise SafetensorsError(f"tensor {name!r}: shape must be a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise SafetensorsError(f"tensor {name!r}: data_offsets must be [begin, end]")
    t = DTYPES[dtype]
    if offsets[1] - offsets[0] != math.prod(shape) * t.itemsize:
        raise SafetensorsError(f"tensor {name!r}: byte length does not match shape and dtype")
    return TensorEntry(name, t, tuple(shape), offsets[0], offsets[1])
