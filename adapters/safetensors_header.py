"""Read a ``.safetensors`` header without loading any tensor (the format, by hand).

Layout: 8 bytes little-endian u64 ``N``, then ``N`` bytes of JSON
``{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then
the data. Offsets are relative to the data start, must tile it exactly, and each tensor's
byte length must equal ``prod(shape) * itemsize``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.errors import InvalidAdapter

ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 16 * 1024 * 1024
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _bad(message: str) -> InvalidAdapter:
    return InvalidAdapter(f"adapter_model.safetensors: {message}", param="adapter_model")


def read_header(path: Path) -> list[TensorInfo]:
    """Every tensor's name, dtype and shape, after checking the file is whole and consistent."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(f"truncated: {size} bytes is too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if (n > MAX_HEADER_BYTES or 8 + n > size) and head.startswith(PICKLE_MAGIC):
            raise _bad(
                "this is a pickle (torch.save) file, not safetensors; pickled weights can run "
                "code when loaded and are refused: save with safetensors"
            )
        if n > MAX_HEADER_BYTES:
            raise _bad(f"header length {n} exceeds {MAX_HEADER_BYTES} bytes (not safetensors?)")
        if 8 + n > size:
            raise _bad(f"truncated: header says {n} bytes but the file has {size - 8}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad("header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    tensors, spans = [], []
    for name, entry in header.items():
        info, span = _entry(name, entry)
        if span[1] > data_len:
            raise _bad(
                f"truncated: tensor {name!r} ends at byte {span[1]} of the data "
                f"but the file holds only {data_len}"
            )
        tensors.append(info)
        spans.append(span)
    _check_tiling(sorted(spans), data_len)
    return tensors


def _entry(name: str, entry: object) -> tuple[TensorInfo, tuple[int, int]]:
    if not isinstance(entry, dict):
        raise _bad(f"tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise _bad(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _bad(f"tensor {name!r}: shape must be a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise _bad(f"tensor {name!r}: data_offsets must be [begin, end] with begin <= end")
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(
            f"tensor {name!r}: {offsets[1] - offsets[0]} bytes stored but shape "
            f"{shape} of {dtype} needs {nbytes}"
        )
    return TensorInfo(name, dtype, tuple(shape), nbytes), (offsets[0], offsets[1])


def _check_tiling(spans: list[tuple[int, int]], data_len: int) -> None:
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise _bad("tensor data overlaps or leaves gaps (data_offsets do not tile the file)")
        pos = end
    if pos != data_len:
        raise _bad(f"{data_len - pos} trailing bytes after the last tensor")
