"""CUDA graphs for decode steps, one per batch-size bucket (and with / without LoRA).
Prefill and mixed steps replay graphs in pieces: ``prefill_graphs.py``.

Every per-step input lives in a static buffer that the graph reads: token ids, positions,
slot mapping, block tables, context lengths, and the LoRA metadata (padded to a number of
segments fixed per graph, so its shapes depend on the bucket only). A step of ``b`` sequences
runs the smallest bucket ``>= b``; padding rows write no KV (slot -1), attend to nothing
(context 0) and use no adapter.

A bucket of ``bs`` rows has up to two LoRA graphs, as the SGMV kernels pick their path from
the padded segment count (``use_token_path``): "segment" (metadata padded to ``bs // 2``
segments: tensor-core tiles of one adapter's tokens) for steps with at most that many
distinct adapters, and "token" (padded to ``min(bs, slots)``: one program per token) for
steps with more. The number of adapter slots does not set the path (there may be thousands).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from loraplex.engine.kernels import LoraMeta, build_lora_meta
from loraplex.engine.kernels.lora_shrink import use_token_path
from loraplex.engine.kernels.tuning import LORA_DECODE_CANDIDATES, LaunchConfigs
from loraplex.engine.lora.pool import LoraPool
from loraplex.engine.model.inputs import HostInputs, gather_sampled, padded_local_slots
from loraplex.engine.model.llama import ForwardInputs, LlamaModel

log = logging.getLogger("loraplex.engine.tuning")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, ... up to ``max_batch`` (which is always the last bucket)."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


def _zipf_rows(rows: int, adapters: int, seed: int = 0) -> torch.Tensor:
    """Each row's slot drawn with Zipf(1) popularity over ``adapters`` slots (a fixed draw):
    the segment graphs' tuning load. Their steps hold up to half as many adapters as rows,
    most far fewer and skewed (the offline workload: ~30 of 32 Zipf adapters at 256 rows);
    tuned on as many even segments as the graph allows, the 256-row graph picked a config
    0.9 % slower on that workload (H100, sweep_decode_lora.py)."""
    w = 1.0 / torch.arange(1, adapters + 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(w, rows, replacement=True, generator=gen).to(torch.int32)


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        lora: LoraPool | None,
        *,
        max_batch: int,
        max_blocks: int,
    ) -> None:
        self.model, self.kv_caches, self.lora = model, kv_caches, lora
        self.buckets = batch_buckets(max_batch)
        self.max_batch, self.max_blocks = max_batch, max_blocks
        dev = model.device
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(max_batch, dtype=i64, device=dev)
        self.positions = torch.zeros(max_batch, dtype=i64, device=dev)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=i64, device=dev)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=i32, device=dev)
        self.context_lens = torch.zeros(max_batch, dtype=i32, device=dev)
        self.local_block_tables = self.local_slot_mapping = None
        # the sliding-window layer groups that read tables of their own (LlamaModel.kv_groups):
        # their block tables and slot mappings are inputs too
        local_groups = max(model.kv_groups, default=0)
        if local_groups:
            g = local_groups
            self.local_block_tables = torch.zeros(g, max_batch, max_blocks, dtype=i32, device=dev)
            self.local_slot_mapping = torch.full((g, max_batch), -1, dtype=i64, device=dev)
        self.cu_q_lens = torch.arange(max_batch + 1, dtype=i32, device=dev)
        self._metas: dict[tuple[int, str], LoraMeta] = {}
        # (bucket, "" without LoRA | "segment" | "token") -> graph, output
        self._graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = None
        # a benchmark's switch (bench_decode --force-segment), set before capture: every LoRA
        # step of 2+ rows on the segment kernels, their meta padded to the bucket
        self.force_segment = False
        # and the other way (bench_decode --force-token): every LoRA step on the per-token
        # kernels, their meta padded to the bucket
        self.force_token = False
        self.last_replayed: tuple[torch.cuda.CUDAGraph, torch.Tensor] | None = None

    def _lora_modes(self, bs: int) -> dict[str, int]:
        """The bucket's LoRA graphs -> the segments their meta is padded to (docstring)."""
        if self.lora is None:
            return {}
        if self.force_token:
            return {"token": bs}
        most = min(bs, self.lora.num_slots)  # a step of bs rows has at most bs adapters
        seg = most if bs >= 2 and self.force_segment else min(bs // 2, most)
        modes = {"segment": seg} if seg >= 1 else {}
        if most > seg:
            modes["token"] = most
        return modes

    def _inputs(self, bs: int, mode: str) -> ForwardInputs:
        lbt, lsm = self.local_block_tables, self.local_slot_mapping
        return ForwardInputs(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            context_lens=self.context_lens[:bs],
            cu_q_lens=self.cu_q_lens[: bs + 1],
            is_decode=True,
            max_q_len=1,
            lora=self._metas[(bs, mode)] if mode else None,
            local_block_tables=None if lbt is None else lbt[:, :bs],
            local_slot_mapping=None if lsm is None else lsm[:, :bs],
        )

    def capture(self) -> None:
        """Capture every bucket, largest first (smaller graphs reuse its memory pool)."""
        self.context_lens.fill_(1)  # capture-time inputs: read block 0, write nothing
        self._mempool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):
            pad = torch.full((bs,), -1, dtype=torch.int32)
            for mode, segs in self._lora_modes(bs).items():
                meta = build_lora_meta(pad, max_segments=segs)
                if mode == "segment" and use_token_path(bs, meta):
                    meta = dataclasses.replace(meta, num_segments=1)  # force_segment
                if (mode == "token") != use_token_path(bs, meta):
                    raise AssertionError(f"bucket {bs}: {mode} graph on the other path")
                self._metas[(bs, mode)] = meta.to(self.model.device)
            for mode in ["", *self._lora_modes(bs)]:
                inp = self._inputs(bs, mode)
                lora = self.lora if mode else None
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self.model.forward(inp, self.kv_caches, lora)  # warm-up (autotune, alloc)
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self._mempool):
                    out = self.model.forward(inp, self.kv_caches, lora)
                self._graphs[(bs, mode)] = (g, out)
        self.context_lens.zero_()
        torch.cuda.synchronize()

    def tune_lora(
        self,
        configs: LaunchConfigs,
        filled: int,
        min_bucket: int = 16,
        reps: int = 5,
        margin: float = 0.01,
        tol: float = 3e-2,
    ) -> dict[str, dict[str, float]]:
        """Fill ``configs``' ``"lora_decode"`` entries missing for this model's LoRA graphs
        (buckets of ``min_bucket`` rows and up, each path): each candidate of
        ``LORA_DECODE_CANDIDATES`` times the whole step (a CUDA graph of the forward,
        replayed ``reps`` times), with the first ``filled`` slots holding adapters (the
        caller writes them): the per-token graph spreads its rows over as many slots as
        the bucket holds, the segment graph over a quarter of its segment count with Zipf
        popularity (``_zipf_rows``). A candidate whose hidden states differ from the rules'
        by more than ``tol`` (relative to their largest) is dropped; another must beat the
        rules by ``margin`` to be kept.
        Call before :meth:`capture`. -> times (ms) by key and candidate."""
        report: dict[str, dict[str, float]] = {}
        if self.lora is None or filled < 1:
            return report
        model = self.model
        width = next(iter(self.lora.layers[0].values())).width  # as the step reads it
        self.context_lens.fill_(1)  # as at capture: read block 0, write nothing
        try:
            for bs in self.buckets:
                if bs < min_bucket:
                    continue
                for mode, segs in self._lora_modes(bs).items():
                    key = model.lora_tune_key(bs, mode, width)
                    if configs.get("lora_decode", key) is not None:
                        continue
                    if mode == "token":
                        tok = torch.arange(bs, dtype=torch.int32) % min(filled, segs)
                    else:
                        tok = _zipf_rows(bs, min(filled, max(1, segs // 4)))
                    meta = build_lora_meta(tok, max_segments=segs)
                    if (mode == "token") != use_token_path(bs, meta):
                        continue  # a forced mode (bench switches): not what serving runs
                    self._metas[(bs, mode)] = meta.to(model.device)
                    report[key] = self._sweep(configs, key, bs, mode, reps, margin, tol)
        finally:
            model.lora_launch = None
            self.context_lens.zero_()
            self._metas.clear()
        torch.cuda.synchronize()
        return report

    def _sweep(
        self,
        configs: LaunchConfigs,
        key: str,
        bs: int,
        mode: str,
        reps: int,
        margin: float,
        tol: float,
    ) -> dict[str, float]:
        inp = self._inputs(bs, mode)

        def run(cfg: dict) -> torch.Tensor:
            self.model.lora_launch = cfg
            return self.model.forward(inp, self.kv_caches, self.lora)

        cands = LORA_DECODE_CANDIDATES[mode]
        ref = run(cands[0]).float()
        scale = ref.abs().max().clamp_min(1e-6)
        ok = [cands[0]]
        for cfg in cands[1:]:
            try:
                off = float((run(cfg).float() - ref).abs().max() / scale)
            except Exception as exc:  # a config this part cannot launch
                log.debug("lora_decode %s: %s failed: %s", key, cfg, exc)
                continue
            if off <= tol:
                ok.append(cfg)
            else:
                log.warning("lora_decode %s: %s off by %.3g, dropped", key, cfg, off)
        best, times = configs.sweep("lora_decode", key, ok, run, reps=reps, margin=margin)
        log.info("kernel tuning: lora_decode %s -> %s", key, best or "the rules")
        return times

    def can_run(self, host: HostInputs) -> bool:
        return bool(self._graphs) and host.is_decode and host.num_seqs <= self.max_batch

    def run(
        self,
        host: HostInputs,
        gather: list[tuple[int, int]] | None = None,
        prev_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Replay the bucket for ``host`` (a decode step) -> hidden ``[b, H]`` (a view).
        ``gather``: token ids read from ``prev_tokens`` on the device (``gather_sampled``)."""
        b = host.num_seqs
        bs = next(x for x in self.buckets if x >= b)
        mb = host.block_tables.shape[1]
        if mb > self.max_blocks:
            raise ValueError(f"block table of {mb} blocks > {self.max_blocks} (max_model_len)")
        # one padded host buffer per input, then one non-blocking copy each
        ids = torch.zeros(bs, dtype=torch.int64)
        pos = torch.zeros(bs, dtype=torch.int64)
        slots = torch.full((bs,), -1, dtype=torch.int64)
        ctx = torch.zeros(bs, dtype=torch.int32)
        ids[:b], pos[:b], slots[:b], ctx[:b] = (
            host.input_ids,
            host.positions,
            host.slot_mapping,
            host.context_lens,
        )
        copies = [
            (self.input_ids, ids),
            (self.positions, pos),
            (self.slot_mapping, slots),
            (self.context_lens, ctx),
        ]
        if self.local_slot_mapping is not None:
            local = padded_local_slots(host, len(self.local_slot_mapping), bs)
            copies.append((self.local_slot_mapping, local))
        for dst, src in copies:
            dst[..., :bs].copy_(src.pin_memory(), non_blocking=True)
        gather_sampled(self.input_ids, gather or [], prev_tokens)
        self.block_tables[:b, :mb].copy_(host.block_tables.pin_memory(), non_blocking=True)
        if self.local_block_tables is not None and host.local_block_tables is not None:
            lbt = host.local_block_tables.pin_memory()
            self.local_block_tables[:, :b, :mb].copy_(lbt, non_blocking=True)
        mode = ""
        if host.has_lora and self.lora is not None:
            tok = torch.full((bs,), -1, dtype=torch.int32)
            tok[:b] = host.token_slot
            modes = self._lora_modes(bs)
            distinct = len(set(host.token_slot.tolist()) - {-1})
            mode = "segment" if distinct <= modes.get("segment", 0) else "token"
            meta = self._metas[(bs, mode)]
            if mode == "token":
                # this graph's SGMV kernels read each token's slot and nothing else: skip
                # grouping into segments (~1 ms of small host torch ops per step at 128 slots)
                meta.token_slot.copy_(tok.pin_memory(), non_blocking=True)
            else:
                meta.copy_(build_lora_meta(tok, max_segments=modes["segment"]))
        g, out = self.last_replayed = self._graphs[(bs, mode)]
        g.replay()
        return out[:b]
