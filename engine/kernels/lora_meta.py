"""Per-step LoRA metadata: tokens grouped into segments by adapter slot.

Built by the runner from the per-token slot index ``token_slot[T]`` (int32, -1 = no adapter)
with torch ops only (no Python loop per token). The SGMV kernels read it:

- ``sorted_tokens[T]``: token indices grouped by slot, adapter tokens first, the -1 tokens last
  (stable: within a segment tokens keep batch order).
- ``seg_start[S+1]``, ``seg_slot[S]``: segment ``s`` is ``sorted_tokens[seg_start[s]:seg_start[s+1]]``,
  all with adapter slot ``seg_slot[s]``.
- ``tile_seg[NT]``, ``tile_start[NT]``: the segments cut into tiles of ``block_m`` tokens
  (``tile_start`` is a position in ``sorted_tokens``); padding tiles have ``tile_seg = -1``.
  One SGMV program handles one tile, so the grid is static: ``NT = cdiv(T, block_m) + S``.
- ``tile_slot[NT]``, ``tile_end[NT]``: per tile its adapter slot (-1 for padding) and the end of
  its segment, so that a program reads its whole work description in one round trip.
- ``token_slot[T]``: read by the per-token (BGMV) decode kernels (one program per token).

``num_segments`` is a host int. For CUDA graphs build with ``max_segments`` (e.g. the number
of LoRA slots): the segment and tile arrays are padded to that bound with empty segments
(slot -1), so their shapes depend only on ``T`` and the bound; copy a fresh meta into the
static one with :meth:`LoraMeta.copy_`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_BLOCK_M = 16


@dataclass
class LoraMeta:
    token_slot: torch.Tensor  # [T] int32, -1 = no adapter
    sorted_tokens: torch.Tensor  # [T] int32
    seg_start: torch.Tensor  # [S+1] int32
    seg_slot: torch.Tensor  # [S] int32 (-1 for padding segments)
    tile_seg: torch.Tensor  # [NT] int32 (-1 for padding tiles)
    tile_start: torch.Tensor  # [NT] int32
    tile_slot: torch.Tensor  # [NT] int32 (-1 for padding tiles)
    tile_end: torch.Tensor  # [NT] int32
    num_segments: int  # S (host int; the padded bound when built with max_segments)
    num_lora_tokens: int  # tokens with an adapter (host int; T when built with max_segments)
    block_m: int = DEFAULT_BLOCK_M

    @property
    def num_tokens(self) -> int:
        return self.token_slot.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LoraMeta:
        """To ``device``; with ``non_blocking``, from pinned copies (a pageable source would
        make the copy wait for the work queued on the stream)."""

        def mv(t: torch.Tensor) -> torch.Tensor:
            if non_blocking and t.device.type == "cpu" and torch.device(device).type == "cuda":
                t = t.pin_memory()
            return t.to(device, non_blocking=non_blocking)

        return LoraMeta(
            mv(self.token_slot),
            mv(self.sorted_tokens),
            mv(self.seg_start),
            mv(self.seg_slot),
            mv(self.tile_seg),
            mv(self.tile_start),
            mv(self.tile_slot),
            mv(self.tile_end),
            self.num_segments,
            self.num_lora_tokens,
            self.block_m,
        )

    @classmethod
    def per_token(cls, token_slot: torch.Tensor) -> LoraMeta:
        """A meta for the per-token kernels only, built on ``token_slot``'s device with no
        sync (the expert LoRA's (token, expert) pairs, whose experts the device chose): the
        segment arrays are placeholders and ``num_segments`` is ``T``, so
        :func:`use_token_path` always picks the per-token kernels. Not for the references."""
        T, dev = token_slot.shape[0], token_slot.device
        one = torch.zeros(1, dtype=torch.int32, device=dev)
        return cls(
            token_slot=token_slot.to(torch.int32),
            sorted_tokens=torch.arange(T, dtype=torch.int32, device=dev),
            seg_start=one,
            seg_slot=one,
            tile_seg=one,
            tile_start=one,
            tile_slot=one,
            tile_end=one,
            num_segments=T,
            num_lora_tokens=T,
        )

    @classmethod
    def grouped(
        cls,
        token_slot: torch.Tensor,
        max_slots: int | None = None,
        block_m: int = DEFAULT_BLOCK_M,
    ) -> LoraMeta:
        """:func:`build_lora_meta`'s grouping done with torch ops on ``token_slot``'s device,
        with no sync (the expert LoRA's (token, expert) pairs, whose experts the device
        chose), for the segment kernels: tensor-core tiles of one (virtual) slot's tokens,
        each slot's A and B read once per tile rather than once per token.

        Shapes depend on ``T`` and ``max_slots`` (a bound on the distinct slots; None: ``T``)
        only: ``S = min(T, max_slots)`` segments, ``NT = min(T, T // block_m + S)`` tiles
        (a run of ``n`` tokens takes ``ceil(n / block_m)`` tiles); the ones past those in
        use are empty (slot -1). The segment arrays are exact up to that padding (the
        references read them). ``num_segments`` is 1, so that :func:`use_token_path` picks
        the segment kernels (from 2 tokens on)."""
        T, dev = token_slot.shape[0], token_slot.device
        S = T if max_slots is None else min(T, max_slots)
        nt = min(T, T // block_m + S)
        i32, none = torch.int32, torch.iinfo(torch.int32).max
        # int32 keys (half the radix passes of int64) and each run's bounds by binary search
        # in the sorted keys: the cummax / cummin scans this replaced ran in one thread block
        # (H100, 65,536 pairs: 360 us of a 1.46 ms expert LoRA; bench_moe_lora.py --profile)
        slot = token_slot.to(i32)
        key, order = torch.sort(torch.where(slot < 0, none, slot), stable=True)
        valid = key != none
        idx = torch.arange(T, device=dev)
        first = torch.ones(T, dtype=torch.bool, device=dev)  # a run of one slot starts here
        first[1:] = key[1:] != key[:-1]
        run_start = torch.searchsorted(key, key, out_int32=True)
        run_end = torch.searchsorted(key, key, right=True, out_int32=True)
        is_tile = ((idx - run_start) % block_m == 0) & valid
        is_seg = first & valid
        slot_of = torch.where(valid, key, -1)

        def put(n: int, at: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor | int]]):
            """[len(rows), n]: each row's ``src`` where ``at`` holds, in order, its ``fill``
            past them (one scatter for every row)."""
            dest = torch.where(at, torch.cumsum(at, 0) - 1, n)  # n: a bin, dropped
            out = torch.empty(len(rows), n + 1, dtype=i32, device=dev)
            for r, (_, fill) in enumerate(rows):
                out[r] = fill
            src = torch.stack([v.to(i32) for v, _ in rows])
            return out.scatter_(1, dest.expand(len(rows), -1), src)[:, :n]

        n_lora = valid.sum().to(i32)
        seg_of = torch.cumsum(first, 0) - 1
        # padding segments: empty, at the end
        seg_start, seg_slot = put(S + 1, is_seg, [(idx, n_lora), (slot_of, -1)])
        tile_seg, tile_start, tile_slot, tile_end = put(
            nt, is_tile, [(seg_of, -1), (idx, 0), (slot_of, -1), (run_end, 0)]
        )
        return cls(
            token_slot=token_slot.to(i32),
            sorted_tokens=order.to(i32),
            seg_start=seg_start,
            seg_slot=seg_slot[:S],
            tile_seg=tile_seg,
            tile_start=tile_start,
            tile_slot=tile_slot,
            tile_end=tile_end,
            num_segments=1 if T else 0,
            num_lora_tokens=T,
            block_m=block_m,
        )

    def copy_(self, other: LoraMeta) -> LoraMeta:
        """Copy ``other`` into this meta's buffers in place (static buffers for CUDA graphs)."""
        if other.block_m != self.block_m:
            raise ValueError("block_m differs")
        for name in (
            "token_slot",
            "sorted_tokens",
            "seg_start",
            "seg_slot",
            "tile_seg",
            "tile_start",
            "tile_slot",
            "tile_end",
        ):
            dst, src = getattr(self, name), getattr(other, name)
            if dst.shape != src.shape:
                raise ValueError(f"{name}: shape {tuple(src.shape)} != static {tuple(dst.shape)}")
            if dst.is_cuda and src.device.type == "cpu":
                src = src.pin_memory()  # pageable: the copy would wait for the stream
            dst.copy_(src, non_blocking=True)
        return self


def build_lora_meta(
    token_slot: torch.Tensor,
    max_segments: int | None = None,
    block_m: int = DEFAULT_BLOCK_M,
) -> LoraMeta:
    """Group tokens by adapter slot. ``token_slot[T]`` int, -1 = no adapter.

    Without ``max_segments`` the arrays are exact; with it, they are padded to that bound.
    Grouped with numpy on the host (the runner builds one meta per step there: 0.14 ms at 256
    tokens on the dev box, half of the ~20 small torch ops it replaced); a device
    ``token_slot`` is read back first (one sync) and the meta returned on its device. Build
    on the CPU and move it with ``.to(device, non_blocking=True)`` to avoid the sync.
    """
    if token_slot.dim() != 1:
        raise ValueError("token_slot must be 1-D [T]")
    if token_slot.device.type != "cpu":
        return build_lora_meta(token_slot.cpu(), max_segments, block_m).to(token_slot.device)
    i64 = np.int64
    slot = token_slot.numpy().astype(i64)
    T = slot.shape[0]
    big = np.iinfo(i64).max
    key = np.where(slot < 0, big, slot)
    order = np.argsort(key, kind="stable")
    sk = key[order]
    starts = np.flatnonzero(np.diff(sk, prepend=sk[:1] - 1)) if T else np.zeros(0, i64)
    uniq = sk[starts]
    counts = np.diff(np.append(starts, T))
    has = uniq != big
    seg_slot, seg_len = uniq[has], counts[has]
    S = int(seg_slot.shape[0])
    n_lora = int(seg_len.sum())
    if max_segments is not None:
        if S > max_segments:
            raise ValueError(f"{S} segments > max_segments={max_segments}")
        pad = max_segments - S
        seg_slot = np.append(seg_slot, np.full(pad, -1, i64))
        seg_len = np.append(seg_len, np.zeros(pad, i64))
        S = max_segments
    seg_start = np.zeros(S + 1, i64)
    np.cumsum(seg_len, out=seg_start[1:])
    n_tiles_seg = (seg_len + block_m - 1) // block_m
    nt_used = int(n_tiles_seg.sum())
    nt = (T + block_m - 1) // block_m + S
    tile_seg = np.repeat(np.arange(S, dtype=i64), n_tiles_seg)
    first_tile = np.cumsum(n_tiles_seg) - n_tiles_seg
    within = np.arange(nt_used, dtype=i64) - first_tile[tile_seg]
    tile_start = seg_start[tile_seg] + within * block_m
    tile_slot = seg_slot[tile_seg]
    tile_end = seg_start[tile_seg + 1]
    pad_t = nt - nt_used
    neg, zero = np.full(pad_t, -1, i64), np.zeros(pad_t, i64)

    def i32(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))

    return LoraMeta(
        token_slot=token_slot.to(torch.int32),
        sorted_tokens=i32(order),
        seg_start=i32(seg_start),
        seg_slot=i32(seg_slot),
        tile_seg=i32(np.append(tile_seg, neg)),
        tile_start=i32(np.append(tile_start, zero)),
        tile_slot=i32(np.append(tile_slot, neg)),
        tile_end=i32(np.append(tile_end, zero)),
        num_segments=S,
        num_lora_tokens=n_lora if max_segments is None else T,
        block_m=block_m,
    )
