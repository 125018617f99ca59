"""The model runner: owns every tensor of the engine and runs one forward per step.

It holds the weights, the paged KV pool, the LoRA slot pool and the decode CUDA graphs. The
scheduler hands it a :class:`ScheduledBatch` (ints only); it returns float32 logits for the
chunks that sample. Adapters are read (and validated) here without GPU work, then copied into
a slot by :meth:`write_slot` from the step thread.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loraplex.engine import kernels as K
from loraplex.engine.batch import ScheduledBatch, SeqChunk
from loraplex.engine.config import KV_CACHE_DTYPES
from loraplex.engine.devices import configure_pinned_memory
from loraplex.engine.kernels._triton import l2_bytes
from loraplex.engine.kernels.fp8_linear import fp8_candidates, fp8_linear_w8a16, fp8_mode
from loraplex.engine.kernels.kv_cache_write import FP8_KV
from loraplex.engine.kernels.lora_expand import token_path_sizes
from loraplex.engine.kernels.tuning import LaunchConfigs
from loraplex.engine.lora.pool import PAGE_ROWS, LoraPool, page_bytes
from loraplex.engine.lora.slots import PageNeed, PagePlan
from loraplex.engine.lora.weights import (
    LoraWeights,
    groups_of,
    random_lora_weights,
    read_adapter,
)
from loraplex.engine.model.cuda_graphs import DecodeGraphs
from loraplex.engine.model.fp8 import Fp8Weight
from loraplex.engine.model.inputs import HostInputs, build_host_inputs, gather_sampled
from loraplex.engine.model.llama import Fp8Options, LlamaModel, fp8_shape_key
from loraplex.engine.model.loader import LoadedModel, load_model
from loraplex.engine.model.prefill_graphs import PrefillGraphs
from loraplex.engine.model.sharding import shard_config
from loraplex.engine.runner import StepTensors

if TYPE_CHECKING:
    from loraplex.engine.parallel import TPGroup

log = logging.getLogger(__name__)
DEFAULT_CPU_KV_BYTES = 512 * 2**20
DEFAULT_LORA_MEMORY_FRACTION = 0.2  # of the GPU memory left after the weights
GRAPH_RESERVE_BYTES = 256 * 2**20  # left free for CUDA graph pools and allocator slack
DEFAULT_PREFILL_GRAPH_TOKENS = 1024  # steps up to this many tokens replay PrefillGraphs


class ModelRunner:
    """``tp``: this runner is one rank of a tensor-parallel group (``engine/tp_runner.py``
    drives them all): it holds that rank's slices of the weights, its KV heads' pages and
    its slices of the adapter pages; ``config`` stays the whole model's, ``local_config``
    is the shape this rank computes with. Every rank must make the same calls in the same
    order (each forward's collectives pair up)."""

    def __init__(
        self,
        model: LoadedModel | str | Path | None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        max_loras: int | None = None,
        max_lora_rank: int = 64,
        lora_memory_bytes: int | None = None,
        lora_memory_fraction: float = DEFAULT_LORA_MEMORY_FRACTION,
        kv_cache_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        num_blocks: int | None = None,
        max_num_batched_tokens: int = 2048,
        enforce_eager: bool = False,
        prefill_graph_tokens: int = DEFAULT_PREFILL_GRAPH_TOKENS,
        seed: int = 0,
        quantization: str | None = None,
        fp8_w8a8_min_tokens: int = 1,
        kernel_config_dir: Path | None = None,
        kernel_tuning: bool = True,
        tp: TPGroup | None = None,
        window_groups: bool = True,
        kv_cache_dtype: str = "auto",
    ) -> None:
        """``window_groups``: sliding-window layers read tables of their own and give the
        blocks behind the window back (``_kv_layout``); False: one table for every layer
        (the layout before, benchmarks/bench_window_kv.py's baseline). ``kv_cache_dtype``:
        "auto" (the model's dtype) or "fp8" (e4m3, scale 1: half the bytes of bf16 a token,
        so twice the tokens in the same memory and half the KV reads of a decode step)."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: one of {KV_CACHE_DTYPES}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cuda":  # before any pinned buffer: new ones at 11 GB/s, not 1.3
            configure_pinned_memory()
        if not isinstance(model, LoadedModel):
            model = load_model(
                model,
                dtype=dtype,
                device=self.device,
                seed=seed,
                shard=None if tp is None else tp.shard,
                tokenizer=tp is None or tp.rank == 0,
                quantization=quantization,
            )
        self.loaded = model
        self.config = cfg = model.config
        self.tp = tp
        self.local_config = cfg if tp is None else shard_config(cfg, tp.size)
        self.dtype = model.weights.embed.dtype
        self.kv_dtype = FP8_KV if kv_cache_dtype == "fp8" else self.dtype
        embed = model.weights.embed
        if self.kv_dtype == FP8_KV and K.use_triton(embed) and not K.fp8_ok(embed):
            raise ValueError("kv_cache_dtype fp8 needs a GPU of compute capability >= 8.9")
        # adapters read into pinned host memory on CUDA (their GPU writes are async copies);
        # False keeps them pageable (bench_adapter_scale --host-pageable: each new pinned
        # buffer is a cudaHostAlloc, whose cost that benchmark's ``pin`` section measures)
        self.pin_adapters = self.device.type == "cuda"
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = min(
            max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings
        )
        self.max_lora_rank = max_lora_rank
        self._utilization = gpu_memory_utilization
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids: set[int] = set(model.eos_token_ids)
        self.tokenizer = model.tokenizer
        self.launch_configs = LaunchConfigs.for_device(self.device, kernel_config_dir)
        self.tuning_report: dict[str, dict[str, float]] = {}
        fp8 = Fp8Options(fp8_w8a8_min_tokens, self.launch_configs)
        self.model = LlamaModel(self.local_config, model.weights, self.max_model_len, fp8, tp)
        if lora_memory_bytes is None:
            lora_memory_bytes = self._lora_budget(max_loras, lora_memory_fraction)
        if tp is not None:  # every rank must cut the same page plan
            lora_memory_bytes = tp.min_int(lora_memory_bytes)
        self.lora = LoraPool(
            self.local_config,
            budget_bytes=lora_memory_bytes,
            max_rank=max_lora_rank,
            dtype=self.dtype,
            device=self.device,
            max_slots=max_loras,
        )
        self.num_slots = self.lora.num_slots
        self.lora_plan: PagePlan = self.lora.plan
        log.info(
            "LoRA pages: %.2f GiB, %d slots",
            self.lora.nbytes() / 2**30,
            self.num_slots,
        )
        self.max_blocks_per_seq = -(-self.max_model_len // block_size)
        self._kv_layout(self.model.windows if window_groups else [0] * cfg.num_layers)
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        # prefill graphs: not for tensor parallelism (collectives inside the pieces) nor MoE
        # (the expert path reads routing counts on the host)
        self.prefill_graph_tokens = min(prefill_graph_tokens, max_num_batched_tokens)
        if tp is not None or cfg.is_moe or enforce_eager:
            self.prefill_graph_tokens = 0
        if num_blocks is None:
            if self.device.type == "cuda":
                num_blocks = self._profile_num_blocks(
                    gpu_memory_utilization, max_num_batched_tokens
                )
            else:
                num_blocks = self._cpu_num_blocks(kv_cache_bytes)
        if tp is not None:  # block tables are the same on every rank
            num_blocks = tp.min_int(num_blocks)
        if num_blocks < 1:
            raise RuntimeError("no memory left for the KV cache")
        # block ids: each holds one group's layers (all layers without a sliding window)
        self.num_blocks = num_blocks * cfg.num_layers // self.kv_group_size
        self.kv_caches = self._alloc_kv(self.num_blocks)
        triton_on_gpu = self.device.type == "cuda" and K.use_triton(model.weights.embed)
        if triton_on_gpu and kernel_tuning and kernel_config_dir is not None:
            self.tune_kernels()
        if triton_on_gpu:
            self._warm_lora()
        if triton_on_gpu and not enforce_eager:
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                self.lora,
                max_batch=max_num_seqs,
                max_blocks=self.max_blocks_per_seq,
            )
            self.model.lora_configs = self.launch_configs
            with torch.inference_mode():
                if kernel_tuning and kernel_config_dir is not None:
                    self.tune_lora()
                self.graphs.capture()
                if self.prefill_graph_tokens > 0:
                    self.prefill_graphs = PrefillGraphs(
                        self.model,
                        self.kv_caches,
                        self.lora,
                        max_tokens=self.prefill_graph_tokens,
                    )
                    pg = self.prefill_graphs
                    log.info(
                        "prefill graphs: %d buckets up to %d tokens, LoRA widths %s: %d "
                        "graphs captured in %.1f s",
                        len(pg.buckets),
                        pg.buckets[-1],
                        pg.widths,
                        len(pg.graphs),
                        pg.build_s,
                    )

    # ---- memory sizing -------------------------------------------------------------------

    def _lora_budget(self, max_loras: int | None, fraction: float) -> int:
        """Bytes of adapter pages when none are given. GPU: ``fraction`` of the memory that
        ``gpu_memory_utilization`` leaves after the weights (the KV pool takes the rest).
        CPU: room for ``max_loras`` (8 when None) adapters of ``max_lora_rank`` on every
        projection."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        pages = -(-self.max_lora_rank // PAGE_ROWS)
        full = sum(page_bytes(self.local_config, elem).values()) * pages
        if self.device.type != "cuda":
            # twice the padded bytes: on tiny models a chunk holds few pages, and chunk
            # rounding per projection can waste up to half of a small arena
            return 2 * (max_loras or 8) * full
        free, total = torch.cuda.mem_get_info(self.device)
        usable = max(0.0, min(free, self._utilization * total - (total - free)))
        return max(int(usable * fraction), full)

    # ---- KV pool -------------------------------------------------------------------------

    def block_bytes(self) -> int:
        c = self.local_config
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * elem

    def _kv_layout(self, windows: list[int]) -> None:
        """Sliding-window layers beside full ones (Gemma 2/3) keep their KV apart: the layers
        are cut into groups of as many as the full ones (the full layers one group, the
        local ones the next, in order; the last maybe partly empty), a block id holds one
        group's KV and each group reads its own table (``block_manager.WindowedBlocks``), so
        the blocks the local layers give back behind the window serve any group. Layer
        ``i`` keeps its KV at ``kv_slot[i]`` of the arena and reads table
        ``model.kv_groups[i]`` (0: the full layers'). Without a window (or one that spans
        the context, or more full layers than local ones): one group of every layer; every
        layer local: one group too, with ``kv_window`` set (``block_manager.LocalBlocks``)."""
        n_full = windows.count(0)
        n_local = len(windows) - n_full
        w = max(windows)
        one_window = len(set(windows) - {0}) == 1 and w < self.max_model_len
        windowed = one_window and 0 < n_full <= n_local
        # every layer local (Mistral v0.1): one table that gives blocks back itself
        self.kv_window = w if windowed or (one_window and not n_full) else 0
        self.kv_group_size = n_full if windowed else len(windows)
        self.kv_local_groups = -(-n_local // n_full) if windowed else 0
        self.kv_slot = list(range(len(windows)))
        if windowed:
            seen = [0, 0]  # full, local layers so far
            for i, win in enumerate(windows):
                local = int(win > 0)
                j = seen[local]
                seen[local] += 1
                self.kv_slot[i] = j % n_full
                self.model.kv_groups[i] = 1 + j // n_full if local else 0
            log.info(
                "KV: %d full layers, %d sliding-window layers in %d groups over one pool",
                n_full, n_local, self.kv_local_groups,
            )  # fmt: skip

    def _id_bytes(self) -> int:
        """The bytes of one block id (a group's layers)."""
        c = self.local_config
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * self.kv_group_size * self.block_size * c.num_kv_heads * c.head_dim * elem

    def _alloc_kv(self, num_ids: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (K, V) cache: views of one arena of ``num_ids`` blocks of a group's
        layers (``_kv_layout``)."""
        c = self.local_config
        shape = (self.kv_group_size, 2, num_ids, self.block_size, c.num_kv_heads, c.head_dim)
        arena = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        return [(arena[j, 0], arena[j, 1]) for j in self.kv_slot]

    def _cpu_num_blocks(self, kv_cache_bytes: int | None) -> int:
        if kv_cache_bytes is None:
            need = self.max_num_seqs * self.max_blocks_per_seq * self.block_bytes()
            kv_cache_bytes = min(DEFAULT_CPU_KV_BYTES, need)
        return max(1, kv_cache_bytes // self.block_bytes())

    def _profile_num_blocks(self, utilization: float, max_tokens: int) -> int:
        """Warm-up forwards (full token budget, LoRA on every group), then size the pool
        from what is left."""
        gc.collect()  # unreachable tensors of earlier objects still count as allocated
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        seq_len = min(self.max_model_len, max_tokens)
        n_seqs = max(1, min(self.max_num_seqs, max_tokens // seq_len))
        per_seq = -(-seq_len // self.block_size)
        ids = n_seqs * per_seq * (self.kv_local_groups + 1)  # (build_host_inputs' stride)
        self.kv_caches = self._alloc_kv(ids)
        self.num_blocks = ids  # the warm forward's host inputs derive the local ids from it
        temp_bytes = ids * self._id_bytes()
        chunks = [
            SeqChunk(
                seq_id=i,
                token_ids=[0] * seq_len,
                start_pos=0,
                block_table=list(range(i * per_seq, (i + 1) * per_seq)),
                adapter_slot=i % self.num_slots,
                sample=True,
            )
            for i in range(n_seqs)
        ]
        self._warm_forward(ScheduledBatch(chunks))  # its LoRA temporaries count in the peak
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del self.kv_caches
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = total - free - torch.cuda.memory_reserved(self.device)
        # an adapter write stages one adapter on the device (LoraPool.write): room for it
        staging = self.lora.staging_bytes()
        budget = (
            total * utilization
            - (peak - temp_bytes)
            - non_torch
            - GRAPH_RESERVE_BYTES
            - self._prefill_graph_bytes()
            - staging
        )
        n = int(budget // self.block_bytes())
        log.info("KV pool: %d blocks (%.2f GiB)", n, n * self.block_bytes() / 2**30)
        return n

    def _prefill_graph_bytes(self) -> int:
        """A bound on what the prefill graphs hold (``PrefillGraphs``): their static buffers
        and one piece's temporaries at the largest bucket, twice over for the allocator's
        rounding."""
        c = self.local_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_token = 4 * c.hidden_size + 2 * c.q_size + c.q_size + 2 * c.kv_size
        per_token += 3 * c.intermediate_size
        return 2 * self.prefill_graph_tokens * per_token * elem

    # ---- steps ---------------------------------------------------------------------------

    def execute(
        self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One forward. -> float32 logits ``[chunks with sample=True, vocab]``, in chunk order.
        ``prev_tokens``: what the previous step sampled (on the device), for
        ``batch.gather``."""
        return self.run(batch, prev_tokens).logits

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None) -> StepTensors:
        """``execute``, plus each ``pool`` chunk's last hidden state, float32, L2-normalized
        (the hidden states are the final norm's output: what the LM head reads)."""
        host = build_host_inputs(
            batch,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            num_slots=self.num_slots,
            local_groups=self.kv_local_groups,
            num_blocks=self.num_blocks,
        )
        if self.graphs is not None and self.graphs.can_run(host):
            hidden = self.graphs.run(host, batch.gather, prev_tokens)
        else:
            slots = {c.adapter_slot for c in batch.chunks}
            groups = self.lora.ranks_used(slots)
            pg = self.prefill_graphs
            rank = max(groups.values(), default=0)
            key = None if pg is None else pg.key(host, len(slots - {-1}), rank)
            if pg is not None and key is not None:
                hidden = pg.run(host, key, batch.gather, prev_tokens)
            else:
                hidden = self._eager(host, groups, batch.gather, prev_tokens)
        idx = host.sample_idx
        pooled = None
        if host.pool_idx is not None:
            pidx = host.pool_idx
            if self.device.type == "cuda":
                pidx = pidx.pin_memory().to(self.device, non_blocking=True)
            pooled = F.normalize(hidden[pidx].float(), dim=-1)
        if self.device.type == "cuda":
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        return StepTensors(self.model.logits(hidden[idx]), pooled)

    def _eager(
        self,
        host: HostInputs,
        lora_groups: dict[str, int],
        gather: list[tuple[int, int]] | None = None,
        prev_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inp = host.to_device(self.device)
        gather_sampled(inp.input_ids, gather or [], prev_tokens)
        if inp.lora is not None:
            inp.lora_groups = lora_groups
        return self.model.forward(inp, self.kv_caches, self.lora)

    @torch.inference_mode()
    def _warm_forward(self, batch: ScheduledBatch, rank: int | None = None) -> None:
        """An eager forward that runs the LoRA of every projection group, whatever the slots
        hold (empty slots have rank 0, their programs return at once): the in-line LoRA
        kernels are compiled here, not in the first step with an adapter, and their
        temporaries count in the memory profile. ``rank``: the adapters' largest rank as the
        step claims it (the segment path's tile width; default the pool's)."""
        host = build_host_inputs(
            batch,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            num_slots=self.num_slots,
            local_groups=self.kv_local_groups,
            num_blocks=self.num_blocks,
        )
        rank = self.max_lora_rank if rank is None else rank
        hidden = self._eager(host, dict.fromkeys(self.model.offsets, rank))
        self.model.logits(hidden[host.sample_idx.to(self.device)])

    def _warm_lora(self) -> None:
        """Compile the LoRA kernels of eager steps now, not in the first step that has an
        adapter: a prefill chunk on one slot (in line, segment path), and one token per
        sequence as a prefill (in line) and as a decode step (beside the GEMMs), each sequence
        on its own slot (per-token path) and all on slot 0 (segment path). The in-line
        per-token expand takes more tiles per program as the token count grows: one more
        prefill per tile config it can reach (``token_path_sizes``; the per-token path runs up
        to ``2 * num_slots - 1`` tokens). The segment path's tile width follows the step's
        largest rank: both segment steps again at each narrower width. Decode graphs compile
        their own when captured. Writes K/V into the first blocks of the pool, which no
        sequence holds yet."""
        if self.num_slots < 1:
            return
        pool = self.num_blocks // (self.kv_local_groups + 1)  # (build_host_inputs' stride)
        m = min(64, self.max_model_len, pool * self.block_size)
        blocks = list(range(-(-m // self.block_size)))
        self._warm_forward(ScheduledBatch([SeqChunk(0, [0] * m, 0, blocks, 0, True)]))
        most = min(pool, self.max_num_seqs)

        def one_token_each(n: int, pos: int, slot_of, rank: int | None = None) -> None:
            one = [
                SeqChunk(seq_id=i, token_ids=[0], start_pos=pos, block_table=[i],
                         adapter_slot=slot_of(i), sample=True)
                for i in range(n)
            ]  # fmt: skip
            self._warm_forward(ScheduledBatch(one), rank)

        for pos in (0, 1):
            # the segment path needs 2+ tokens per segment, the per-token path fewer
            one_token_each(max(1, min(most, self.num_slots)), pos, lambda i: i)
            one_token_each(min(most, 2), pos, lambda i: 0)
        if self.device.type != "cuda":
            return  # the CPU runs the references
        for r in (16, 32):  # the segment kernels' narrower tiles (lora_shrink.seg_rank)
            if r < self.max_lora_rank:
                chunk = SeqChunk(0, [0] * m, 0, blocks, 0, True)
                self._warm_forward(ScheduledBatch([chunk]), r)
                for pos in (0, 1):
                    one_token_each(min(most, 2), pos, lambda i: 0, r)
        t_max = min(most, 2 * self.num_slots - 1)
        sizes: set[int] = set()
        for offs in self.model.offsets.values():
            outs = [b - a for a, b in itertools.pairwise(offs)]
            sizes.update(token_path_sizes(self.max_lora_rank, outs, self.device, t_max))
        for n in sorted(sizes - {max(1, min(most, self.num_slots))}):
            one_token_each(n, 0, lambda i: i % self.num_slots)

    def tune_kernels(self, save: bool = True) -> dict[str, dict[str, float]]:
        """Fill the launch-config table for this GPU model: each FP8 projection shape's
        Triton GEMM at each token bucket and mode it runs (weight-only, FP8 activations; up to
        the batch bound), over :func:`fp8_candidates`. Each candidate is timed over the layers'
        own weights, as many as it takes to be four times the L2 (a step streams them from
        memory). Entries already there are kept. -> the timings of the shapes measured now
        (ms by candidate), also kept as ``tuning_report``."""
        measured: dict[str, dict[str, float]] = {}
        self.tuning_report = measured
        layers = self.loaded.weights.layers
        if not K.fp8_ok(self.loaded.weights.embed) or not layers:
            return measured
        top = max(self.max_num_seqs, 16)
        for name in ("qkv", "o", "gate_up", "down"):  # the dense projections (MoE: attention)
            ws = [w for w in (getattr(lw, name) for lw in layers) if isinstance(w, Fp8Weight)]
            if not ws:
                continue
            need, used = 4 * l2_bytes(self.device), 0
            for i, w in enumerate(ws):
                used += w.qweight.numel()
                if used >= need:
                    ws = ws[: i + 1]
                    break
            w0, m = ws[0], 16
            while True:
                lo = 1 if m == 16 else m // 2 + 1  # the bucket's fewest tokens
                mins = self.model.fp8.w8a8_min_tokens
                modes = {fp8_mode(t, w0.block, self.dtype, mins) for t in range(lo, m + 1)}
                for a8 in [mode == "a8" for mode in sorted(modes - {"w8a8"})]:
                    key = fp8_shape_key(w0, m, a8)
                    if self.launch_configs.get("fp8_w8a16", key) is not None:
                        continue
                    x = torch.randn(m, w0.shape[1], device=self.device, dtype=self.dtype)

                    def run(cfg: dict, x: torch.Tensor = x, ws: list[Fp8Weight] = ws) -> None:
                        for w in ws:
                            fp8_linear_w8a16(x, w.qweight, w.scale, w.block, None, cfg)

                    best, times = self.launch_configs.sweep(
                        "fp8_w8a16", key, fp8_candidates(m, w0.block, a8), run
                    )
                    log.info("kernel tuning: fp8_w8a16 %s -> %s", key, best)
                    measured[key] = {k: v / len(ws) for k, v in times.items()}
                if m >= top:
                    break
                m *= 2
        if measured and save:
            self.launch_configs.save()
        return measured

    def tune_lora(self, save: bool = True) -> dict[str, dict[str, float]]:
        """Fill the launch-config table's decode-graph LoRA entries for this GPU model and
        this model's shapes (``DecodeGraphs.tune_lora``): adapters of rank
        ``min(16, max_lora_rank)`` on the attention and dense MLP groups written into as many
        slots as the largest graph has rows (or the pool's pages hold), each candidate timed
        over whole decode steps, the slots cleared after. Entries already there are kept; a
        tensor-parallel rank tunes nothing (the rules or the cached entries).
        -> times (ms) by key and candidate, also in ``tuning_report``."""
        if self.graphs is None or self.num_slots < 1 or self.tp is not None:
            # tensor parallelism: each rank would time its own candidates, and a candidate
            # dropped on one rank only would leave the ranks' collectives out of step
            return {}
        t0 = time.perf_counter()
        groups = tuple(g for g in groups_of(self.local_config) if not g.startswith("experts_"))
        rank = min(16, self.max_lora_rank)
        weights = random_lora_weights(
            self.local_config, rank, self.dtype, groups=groups, device=self.device
        )
        filled = 0
        try:
            for slot in range(min(self.num_slots, self.max_num_seqs)):
                try:
                    self.lora.write(slot, weights)
                except RuntimeError:  # the pool's pages are spent
                    break
                filled += 1
            report = self.graphs.tune_lora(self.launch_configs, filled)
        finally:
            for slot in range(filled):
                self.lora.clear(slot)
            torch.cuda.synchronize(self.device)
        if report:
            log.info(
                "kernel tuning: %d decode LoRA shapes over %d adapters in %.1f s",
                len(report), filled, time.perf_counter() - t0,
            )  # fmt: skip
            if save:
                self.launch_configs.save()
        self.tuning_report.update(report)
        return report

    # ---- adapters ------------------------------------------------------------------------

    def read_adapter(self, path: Path) -> LoraWeights:
        """Read and validate a PEFT adapter into host memory (pinned on GPU). Thread-safe."""
        return read_adapter(
            Path(path),
            self.config,
            max_rank=self.max_lora_rank,
            dtype=self.dtype,
            pin_memory=self.pin_adapters,
        )

    def adapter_pages(self, weights: LoraWeights) -> PageNeed:
        """The pages of each projection group that ``weights`` takes in GPU memory."""
        return self.lora.page_need(weights)

    def write_slot(
        self, slot: int, weights: LoraWeights, pages: dict[str, list[int]] | None = None
    ) -> None:
        """``pages``: from the engine's ``SlotTable``; None for a runner used on its own
        (tests, benchmarks), where the pool places them (``LoraPool.write``)."""
        self.lora.write(slot, weights, pages)

    def clear_slot(self, slot: int) -> None:
        self.lora.clear(slot)

    def check_alive(self) -> None:
        """Nothing to check: this runner is one process."""

    def close(self) -> None:
        """Nothing to stop (the tensors go with the object)."""
