"""Piecewise CUDA graphs for prefill and mixed steps (:class:`PrefillGraphs`).

Decode steps replay whole-step graphs (``cuda_graphs.py``); a step with a prefill chunk has
sequence lengths that only the attention's grid reads on the host, so its forward replays
one graph per layer boundary with the attention launched between them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import torch

from loraplex.engine.kernels import LoraMeta, build_lora_meta
from loraplex.engine.kernels.lora_shrink import seg_rank, use_token_path
from loraplex.engine.lora.pool import LoraPool
from loraplex.engine.model.inputs import HostInputs, gather_sampled, padded_local_slots
from loraplex.engine.model.llama import ForwardInputs, LlamaModel


def prefill_buckets(max_tokens: int) -> list[int]:
    """The token counts of the prefill graphs: 16, 32, 64, then every 128 (a step runs the
    smallest that holds it), up to ``max_tokens`` rounded up to a multiple of 16."""
    top = max(16, -(-max_tokens // 16) * 16)
    out = [t for t in (16, 32, 64, *range(128, top, 128)) if t < top]
    return [*out, top]


def lora_widths(max_rank: int) -> list[int]:
    """The segment path's partials widths that prefill graphs are captured at (a step runs
    the narrowest that holds its adapters' largest rank): 16, 32 and the pool's own."""
    return sorted({seg_rank(r, max_rank) for r in (16, 32, max_rank)})


class PrefillGraphs:
    """Piecewise CUDA graphs for the steps that are not pure decode steps (prefill chunks,
    alone or mixed with decode tokens) of up to ``max_tokens`` tokens.

    Eager, such a step launches some 17 kernels a layer (about 1,200 for an 8B model with
    LoRA), and up to a few hundred tokens its host time is longer than its GPU time: the
    first token waits on Python. Only attention reads the step's sequence lengths on the
    host (its grid), so each layer splits there: a step replays one graph per layer
    boundary (:meth:`LlamaModel.embed` + the first :meth:`LlamaModel.attn_in`, then
    ``attn_out`` of layer i + ``attn_in`` of layer i + 1, ..., then the last ``attn_out`` +
    :meth:`LlamaModel.final_norm`), and launches the attention eagerly between them. vLLM's
    "piecewise" graphs split the same way.

    One set of pieces per token bucket (:func:`prefill_buckets`; a step of ``T`` tokens runs
    the smallest bucket ``>= T``, its padding rows write no KV (slot -1) and use no adapter)
    and per LoRA mode: none, or the segment path at each of :func:`lora_widths` with its
    meta padded to ``min(slots, bucket // 2)`` segments (so a step with more distinct
    adapters than that takes a larger bucket). The pieces pass q, the attention's output
    and the residual stream through three static buffers shared by every bucket, copied at
    each boundary (two copies of ``[T, H]`` a layer).

    ``capture=False`` runs the same pieces eagerly over the same static buffers (the CPU's
    check of the padding and the split, and what each captured piece does when replayed).
    """

    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        lora: LoraPool | None,
        *,
        max_tokens: int,
        capture: bool = True,
    ) -> None:
        if model.tp is not None or model.config.is_moe:
            raise ValueError("prefill graphs: not for tensor-parallel or MoE models")
        self.model, self.kv_caches, self.lora = model, kv_caches, lora
        self.buckets = prefill_buckets(max_tokens)
        self.widths = [] if lora is None else lora_widths(lora.max_rank)
        self.num_layers = len(model.weights.layers)
        c, dev, dt = model.config, model.device, model.dtype
        top = self.buckets[-1]
        i64 = torch.int64
        self.input_ids = torch.zeros(top, dtype=i64, device=dev)
        self.positions = torch.zeros(top, dtype=i64, device=dev)
        self.slot_mapping = torch.full((top,), -1, dtype=i64, device=dev)
        local_groups = max(model.kv_groups, default=0)  # as DecodeGraphs'
        self.local_slot_mapping = (
            torch.full((local_groups, top), -1, dtype=i64, device=dev) if local_groups else None
        )
        self.q_buf = torch.zeros(top, c.q_size, dtype=dt, device=dev)
        self.attn_buf = torch.zeros(top, c.q_size, dtype=dt, device=dev)
        self.res_buf = torch.zeros(top, c.hidden_size, dtype=dt, device=dev)
        self.out_buf = torch.zeros(top, c.hidden_size, dtype=dt, device=dev)
        self._metas: dict[tuple[int, int], LoraMeta] = {}
        self._inputs: dict[tuple[int, int], ForwardInputs] = {}
        # (bucket, LoRA width or 0) -> its pieces, in order (graph replays, or eager calls)
        self._pieces: dict[tuple[int, int], list[Callable[[], None]]] = {}
        self.graphs: list[torch.cuda.CUDAGraph] = []  # captured (kept alive with their pool)
        t0 = time.perf_counter()
        self._build(capture)
        self.build_s = time.perf_counter() - t0  # the capture's time (warm-ups included)

    def segments(self, bucket: int) -> int:
        """The segments a bucket's LoRA meta is padded to (its most distinct adapters)."""
        slots = 0 if self.lora is None else self.lora.num_slots
        return min(slots, bucket // 2)

    def _piece(self, k: int, inp: ForwardInputs) -> None:
        """Piece ``k`` of a step over the static buffers (class docstring)."""
        m, T = self.model, inp.input_ids.shape[0]
        lora = self.lora if inp.lora is not None else None
        if k == 0:
            x, res = m.embed(inp), None
        else:
            x, res = m.attn_out(k - 1, self.attn_buf[:T], self.res_buf[:T], inp, lora)
        if k == self.num_layers:
            self.out_buf[:T].copy_(m.final_norm(x, res))
            return
        q, res = m.attn_in(k, x, res, inp, self.kv_caches, lora)
        self.q_buf[:T].copy_(q.reshape(T, -1))
        self.res_buf[:T].copy_(res)

    def _attention(self, k: int, bucket: int, attn: ForwardInputs) -> None:
        c = self.model.config
        q = self.q_buf[:bucket].view(bucket, c.num_heads, c.head_dim)
        self.model.attention(k, q, attn, self.kv_caches, out=self.attn_buf[:bucket])

    def _build(self, capture: bool) -> None:
        """Every bucket's inputs and pieces, largest first (on CUDA, captured into one memory
        pool: smaller buckets reuse the larger ones' temporaries)."""
        dev = self.model.device
        pool = torch.cuda.graph_pool_handle() if capture else None
        block_size = self.kv_caches[0][0].shape[1]
        for bucket in reversed(self.buckets):
            for width in [0, *self.widths]:
                key = (bucket, width)
                meta = None
                if width:
                    pad = torch.full((bucket,), -1, dtype=torch.int32)
                    meta = build_lora_meta(pad, max_segments=self.segments(bucket)).to(dev)
                    if use_token_path(bucket, meta):
                        raise AssertionError(f"bucket {bucket}: prefill graph on the token path")
                    self._metas[key] = meta
                inp = ForwardInputs(
                    input_ids=self.input_ids[:bucket],
                    positions=self.positions[:bucket],
                    slot_mapping=self.slot_mapping[:bucket],
                    block_tables=torch.zeros(1, 1, dtype=torch.int32, device=dev),
                    context_lens=torch.zeros(1, dtype=torch.int32, device=dev),
                    cu_q_lens=torch.zeros(2, dtype=torch.int32, device=dev),
                    is_decode=False,
                    max_q_len=bucket,
                    lora=meta,
                    lora_groups=dict.fromkeys(self.model.offsets, width) if width else None,
                )
                lsm = self.local_slot_mapping
                if lsm is not None:
                    inp.local_slot_mapping = lsm[:, :bucket]
                    inp.local_block_tables = inp.block_tables.expand(len(lsm), -1, -1)
                self._inputs[key] = inp
                pieces = [
                    functools.partial(self._piece, k, inp) for k in range(self.num_layers + 1)
                ]
                if not capture:
                    self._pieces[key] = pieces
                    continue
                # warm-up (compiles, autotunes, allocates), the attention over one sequence
                # of the whole bucket reading block 0 (slot -1: nothing is written)
                tables = torch.zeros(1, -(-bucket // block_size), dtype=torch.int32, device=dev)
                warm = dataclasses.replace(
                    inp,
                    block_tables=tables,
                    local_block_tables=None if lsm is None else tables.expand(len(lsm), -1, -1),
                    context_lens=torch.full((1,), bucket, dtype=torch.int32, device=dev),
                    cu_q_lens=torch.tensor([0, bucket], dtype=torch.int32, device=dev),
                )
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for k, piece in enumerate(pieces):
                        piece()
                        if k < self.num_layers:
                            self._attention(k, bucket, warm)
                torch.cuda.current_stream().wait_stream(stream)
                graphs = []
                for piece in pieces:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        piece()
                    graphs.append(g)
                self.graphs += graphs
                self._pieces[key] = [g.replay for g in graphs]
        if capture:
            torch.cuda.synchronize()

    def key(self, host: HostInputs, adapters: int, rank: int) -> tuple[int, int] | None:
        """The (bucket, LoRA width) that runs ``host``, whose chunks use ``adapters``
        distinct adapter slots of at most ``rank``; None: eager (a decode step, more tokens
        than the largest bucket, a wider rank)."""
        T = host.num_tokens
        if host.is_decode or T > self.buckets[-1]:
            return None
        width = 0
        if adapters:
            width = next((w for w in self.widths if w >= rank), 0)
            if not width:
                return None
        for bucket in self.buckets:
            if bucket >= T and (not width or self.segments(bucket) >= adapters):
                return bucket, width
        return None

    def run(
        self,
        host: HostInputs,
        key: tuple[int, int],
        gather: list[tuple[int, int]] | None = None,
        prev_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``host`` (a step :meth:`key` placed) -> hidden ``[T, H]`` (a view of a static
        buffer: read it before the next step). ``gather``: as :meth:`DecodeGraphs.run`."""
        bucket, width = key
        T, dev = host.num_tokens, self.model.device
        cuda = dev.type == "cuda"

        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(dev, non_blocking=True) if cuda else t.to(dev)

        ids = torch.zeros(bucket, dtype=torch.int64)
        pos = torch.zeros(bucket, dtype=torch.int64)
        slots = torch.full((bucket,), -1, dtype=torch.int64)
        ids[:T], pos[:T], slots[:T] = host.input_ids, host.positions, host.slot_mapping
        copies = [(self.input_ids, ids), (self.positions, pos), (self.slot_mapping, slots)]
        local_bt = None
        if self.local_slot_mapping is not None:
            local = padded_local_slots(host, len(self.local_slot_mapping), bucket)
            copies.append((self.local_slot_mapping, local))
            local_bt = mv(host.local_block_tables)
        for dst, src in copies:
            dst[..., :bucket].copy_(mv(src), non_blocking=cuda)
        gather_sampled(self.input_ids, gather or [], prev_tokens)
        if width:
            tok = torch.full((bucket,), -1, dtype=torch.int32)
            tok[:T] = host.token_slot
            meta = build_lora_meta(tok, max_segments=self.segments(bucket))
            self._metas[key].copy_(meta)
        attn = dataclasses.replace(
            self._inputs[key],
            block_tables=mv(host.block_tables),
            local_block_tables=local_bt,
            context_lens=mv(host.context_lens),
            cu_q_lens=mv(host.cu_q_lens),
            max_q_len=host.max_q_len,
        )
        for k, piece in enumerate(self._pieces[key]):
            piece()
            if k < self.num_layers:
                self._attention(k, bucket, attn)
        return self.out_buf[:T]
