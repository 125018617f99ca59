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

import functools
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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


class TensorEntry(NamedTuple):  # a tuple: ~0.3 us to make against a frozen dataclass's 0.6
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data region
    end: int


@dataclass
class SafetensorsFile:
    entries: list[TensorEntry]  # in offset order
    data: torch.Tensor  # uint8 view of the data region (a memory map)
    header: bytes = b""  # the JSON header as stored: files with equal headers hold equal tensors

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
        raw = f.read(n)
        data_len = size - 8 - n
        if len(raw) <= CACHED_HEADER_BYTES:
            entries = list(_cached_entries(raw, data_len))
        else:
            entries = _entries(raw, data_len)
        if data_len == 0:
            return SafetensorsFile(entries, torch.empty(0, dtype=torch.uint8), raw)
        # Private and writable only so torch takes it without a warning; never written, so
        # no page is copied (MAP_POPULATE would copy them all: it prefaults for writing).
        mm = mmap.mmap(
            f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            mm.madvise(mmap.MADV_WILLNEED)  # read ahead now when it is not in the page cache
    data = torch.frombuffer(mm, dtype=torch.uint8, offset=8 + n, count=data_len)
    return SafetensorsFile(entries, data, raw)


def _entries(raw: bytes, data_len: int) -> list[TensorEntry]:
    """The header's tensors in offset order, checked: each entry, and offsets that tile the
    ``data_len`` bytes of data exactly."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    header.pop("__metadata__", None)
    entries = sorted((_entry(k, v) for k, v in header.items()), key=lambda e: e.begin)
    pos = 0
    for e in entries:
        if e.begin != pos:
            raise SafetensorsError("data_offsets overlap or leave gaps")
        pos = e.end
    if pos != data_len:
        raise SafetensorsError(f"the data holds {data_len} bytes, the header {pos}")
    return entries


# Adapters of one base, rank and targets share their header byte for byte (names, shapes,
# offsets): a load of the next one skips the JSON and the ~420 entry checks (~0.8 ms of a
# ~6 ms SmolLM2 read on the dev box). Only headers that passed are kept, and only small ones.
CACHED_HEADER_BYTES = 1 << 18  # at most 16 MiB held by the 64 kept


@functools.lru_cache(maxsize=64)
def _cached_entries(raw: bytes, data_len: int) -> tuple[TensorEntry, ...]:
    return tuple(_entries(raw, data_len))


def _entry(name: str, entry: object) -> TensorEntry:
    # runs once per tensor of every adapter load (~420 for a 30-layer model): plain loops,
    # no generator per check
    if not isinstance(entry, dict):
        raise SafetensorsError(f"tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    t = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if t is None:
        raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r}")
    count = 1
    if type(shape) is list:
        for d in shape:
            if type(d) is not int or d < 0:
                break
            count *= d
        else:
            shape = tuple(shape)
    if type(shape) is not tuple:
        raise SafetensorsError(f"tensor {name!r}: shape must be a list of non-negative integers")
    if type(offsets) is not list or len(offsets) != 2:
        raise SafetensorsError(f"tensor {name!r}: data_offsets must be [begin, end]")
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
        raise SafetensorsError(f"tensor {name!r}: data_offsets must be [begin, end]")
    if end - begin != count * t.itemsize:
        raise SafetensorsError(f"tensor {name!r}: byte length does not match shape and dtype")
    return TensorEntry(name, t, shape, begin, end)
