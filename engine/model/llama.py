"""The Llama-family forward over a paged KV cache, with batched multi-adapter LoRA.

One forward serves every family in :mod:`engine.model.config`; a family differs only in
flags there (Qwen2's qkv bias, Qwen3's q/k norm, Phi-3's fused checkpoint names, which the
loader reads into the same fused weights; Gemma's norms around each block, GeGLU, local
layers with their own window and rope, soft-capped scores and logits). Weights are held
fused: ``qkv`` (q, k, v stacked on the output dim) and ``gate_up``; each dense projection a
tensor or FP8 (``model/fp8.py``; MoE experts stay dense). Every
op goes through :mod:`engine.kernels` (Triton on CUDA, torch references on CPU). The forward
reads no host state: all per-step inputs arrive in one :class:`ForwardInputs` value, which the
runner fills (into static buffers when replaying a CUDA graph).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from loraplex.engine import kernels as K
from loraplex.engine.kernels import LoraMeta
from loraplex.engine.kernels.fp8_linear import fp8_mode
from loraplex.engine.kernels.lora_shrink import use_token_path
from loraplex.engine.kernels.tuning import LaunchConfigs
from loraplex.engine.lora.pool import LoraGroup, LoraPool
from loraplex.engine.model.config import ModelConfig
from loraplex.engine.model.fp8 import Fp8Weight, Weight
from loraplex.engine.model.moe import SideStream, expert_grouped, moe_mlp

if TYPE_CHECKING:
    from loraplex.engine.parallel import TPGroup


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    qkv: Weight  # [q + 2kv, H] (the dense projections: a tensor or an Fp8Weight)
    qkv_bias: torch.Tensor | None  # [q + 2kv] (Qwen2)
    q_norm: torch.Tensor | None  # [head_dim] (Qwen3), with k_norm
    k_norm: torch.Tensor | None
    o: Weight  # [H, q]
    post_norm: torch.Tensor  # [H]
    gate_up: Weight  # [2I, H]; MoE: every expert's, [E, 2I, H] (I: moe_intermediate), dense
    down: Weight  # [H, I]; MoE: [E, H, I], dense
    router: torch.Tensor | None = None  # [E, H] (MoE: the layer's ``mlp.gate``)
    # Gemma: the norms before and after the MLP (``post_norm`` then normalizes the
    # attention's output); all Gemma norms hold 1 + w in float32
    pre_ff_norm: torch.Tensor | None = None  # [H]
    post_ff_norm: torch.Tensor | None = None  # [H]


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]; the embedding itself when tied

    def nbytes(self) -> int:
        seen: dict[int, int] = {}
        for t in self.tensors():
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    def tensors(self) -> list[torch.Tensor]:
        out = [self.embed, self.norm, self.lm_head]
        for lw in self.layers:
            out += [lw.input_norm, lw.post_norm]
            for w in (lw.qkv, lw.o, lw.gate_up, lw.down):
                out += w.tensors() if isinstance(w, Fp8Weight) else [w]
            extra = (lw.qkv_bias, lw.q_norm, lw.k_norm, lw.router, lw.pre_ff_norm, lw.post_ff_norm)
            out += [t for t in extra if t is not None]
        return out


@dataclass
class ForwardInputs:
    """One step's inputs, all on the model's device.

    ``T`` tokens of ``B`` sequences. On the decode path ``T == B`` (one token per sequence)
    and ``cu_q_lens`` is unused.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64 (-1: padding, not written)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: cached + new tokens
    cu_q_lens: torch.Tensor  # [B+1] int32
    is_decode: bool
    max_q_len: int
    lora: LoraMeta | None  # None: no token of this step uses an adapter
    # the groups the step's adapters touch -> their largest rank there (host ints; sizes the
    # segment-path LoRA kernels). None: every group, at the pool's max rank (CUDA graphs)
    lora_groups: Mapping[str, int] | None = None
    # a model whose sliding-window layers read tables of their own (``LlamaModel.kv_groups``):
    # each local layer group's block tables and slot mapping. None: one table for all
    local_block_tables: torch.Tensor | None = None  # [G, B, max_blocks] int32
    local_slot_mapping: torch.Tensor | None = None  # [G, T] int64


@dataclass
class Fp8Options:
    """How FP8 projections run: activations in FP8 from ``w8a8_min_tokens`` tokens up (the
    Triton GEMM quantizing them inside up to 32 tokens, ``torch._scaled_mm`` past that), the
    weight-only GEMM below; the Triton GEMM's launch configs from ``configs`` (per GPU model,
    filled by the warm-up; None or no entry: the kernel's defaults)."""

    w8a8_min_tokens: int = 1
    configs: LaunchConfigs | None = None


def fp8_shape_key(w: Fp8Weight, m: int, a8: bool = False) -> str:
    """The launch-config key of a Triton FP8 GEMM: N, K, the scale layout, the token bucket
    (the next power of two from 16), and ``:a8`` for FP8 activations."""
    bucket = max(16, 1 << max(0, m - 1).bit_length())
    blk = "c" if w.block is None else f"b{w.block[0]}x{w.block[1]}"
    return f"{w.shape[0]}x{w.shape[1]}:{blk}:m{bucket}" + (":a8" if a8 else "")


class LlamaModel:
    """``tp``: this rank's tensor-parallel group, with ``config`` its shard's shape and
    ``weights`` its slices (``engine/model/sharding.py``); None: the whole model here."""

    def __init__(
        self,
        config: ModelConfig,
        weights: LlamaWeights,
        max_positions: int,
        fp8: Fp8Options | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        self.config = config
        self.weights = weights
        self.fp8 = fp8 or Fp8Options()
        self.tp = tp
        dev = weights.embed.device
        inv_freq, scale = config.rope_inv_freq().to(dev), config.rope_scaling.attention_factor
        self.cos_sin = K.rotary_cos_sin_cache(inv_freq, max_positions, scale)
        local = config.local_rope_inv_freq()  # Gemma 3's local layers: their own rope
        self.local_cos_sin = (
            None if local is None else K.rotary_cos_sin_cache(local.to(dev), max_positions)
        )
        self.scale = config.attn_scale
        self.softcap = config.attn_logit_softcap or 0.0
        self.windows = [config.layer_window(i) for i in range(config.num_layers)]
        # each layer's KV table: 0 the step's block tables, g > 0 local layer group g's
        # (ModelRunner._kv_layout sets them when the sliding-window layers keep their own)
        self.kv_groups = [0] * config.num_layers
        # Gemma: embeddings times sqrt(hidden), rounded to the model dtype as transformers does
        self.embed_scale = (
            torch.tensor(config.hidden_size**0.5, dtype=weights.embed.dtype, device=dev)
            if config.gemma_norm
            else None
        )
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"
        c = config
        # each group's projection boundaries in its output (lora_expand's out_offsets)
        self.offsets = {
            "qkv": [0, c.q_size, c.q_size + c.kv_size, c.q_size + 2 * c.kv_size],
            "o": [0, c.hidden_size],
            "gate_up": [0, c.intermediate_size, 2 * c.intermediate_size],
            "down": [0, c.hidden_size],
            "experts_gate_up": [0, c.moe_intermediate_size, 2 * c.moe_intermediate_size],
            "experts_down": [0, c.hidden_size],
        }
        # decode steps run each group's LoRA on this stream, beside the base GEMM (CUDA only;
        # high priority so that its small kernels are scheduled ahead of the GEMM's tail)
        self.side_stream = torch.cuda.Stream(dev, priority=-1) if dev.type == "cuda" else None
        # MoE: the expert LoRA of decode steps as deltas beside the grouped GEMMs (moe_mlp's
        # ``beside``). Off until measured on a GPU: bench_moe_lora.py's "beside" row and
        # bench_throughput.py --moe-lora-beside (recapture the decode graphs after setting it)
        self.moe_lora_beside = False
        # steps with the LoRA in line on the segment path: the gate/up expand inside the
        # activation (_gate_up_act). False: expand, then activation (benchmarks' control;
        # recapture the prefill graphs after setting it)
        self.fuse_lora_act = True
        # the decode graphs' LoRA launch configs, per batch bucket, path and pool rank, as the
        # warm-up measured them on this GPU model (DecodeGraphs.tune_lora; None or no entry:
        # the kernels' rules). ``lora_launch``: one override for every decode step's LoRA
        # while a tuning run times a candidate
        self.lora_configs: LaunchConfigs | None = None
        self.lora_launch: dict | None = None

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def linear(self, x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """One base projection: ``F.linear`` of a dense weight, ``K.fp8_linear`` of an FP8
        one (its launch config looked up by shape; host ints only, so graph-safe)."""
        if isinstance(w, torch.Tensor):
            return F.linear(x, w, bias)
        cfg = None
        if self.fp8.configs is not None:
            mode = fp8_mode(x.shape[0], w.block, x.dtype, self.fp8.w8a8_min_tokens)
            a8 = x.is_cuda and mode == "a8"
            cfg = self.fp8.configs.get("fp8_w8a16", fp8_shape_key(w, x.shape[0], a8))
        return K.fp8_linear(
            x, w.qweight, w.scale, w.block, bias,
            w8a8_min_tokens=self.fp8.w8a8_min_tokens, config=cfg,
        )  # fmt: skip

    def lora_tune_key(self, tokens: int, path: str, pool_rank: int) -> str:
        """The launch-config key of a decode step's LoRA (``"lora_decode"`` entries): its
        tokens (the graph's bucket), the SGMV path ("token" or "segment", as
        ``use_token_path`` picks it), the pool's rank, and this model's (shard's) widths."""
        c = self.config
        qkv = c.q_size + 2 * c.kv_size
        return f"{path}:b{tokens}:r{pool_rank}:h{c.hidden_size}:qkv{qkv}:i{c.intermediate_size}"

    def _decode_launch(self, tokens: int, group: LoraGroup, meta: LoraMeta) -> dict:
        """The launch configs of a decode step's LoRA beside the GEMMs -> ``{"shrink": ...,
        "expand": ...}`` (empty: the kernels' rules). Host ints only: graph-safe."""
        if self.lora_launch is not None:
            return self.lora_launch
        if self.lora_configs is None:
            return {}
        path = "token" if use_token_path(tokens, meta) else "segment"
        key = self.lora_tune_key(tokens, path, group.width)
        return self.lora_configs.get("lora_decode", key) or {}

    @staticmethod
    def _uses(inp: ForwardInputs, name: str) -> bool:
        return inp.lora is not None and (inp.lora_groups is None or name in inp.lora_groups)

    @contextmanager
    def _beside(self) -> Iterator[None]:
        """Work issued inside runs beside the main stream's next ops (the side stream on CUDA,
        forked after everything issued so far; in line elsewhere). :meth:`_join` ends it."""
        with SideStream(self.side_stream):
            yield

    def _join(self) -> None:
        SideStream(self.side_stream).join()

    def _proj(
        self,
        x: torch.Tensor,
        weight: Weight,
        groups: dict[str, LoraGroup] | None,
        name: str,
        inp: ForwardInputs,
        *,
        beside: bool,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One projection group's base GEMM and its LoRA. -> ``(y, delta)``.

        In line (``beside=False``): ``y = x W^T + x A B``, delta None. Beside the GEMM: with
        ``residual``, the LoRA adds into the residual stream and delta is None; without, the
        LoRA's delta (zero rows where no adapter applies) for the consumer to add."""
        if groups is None or not self._uses(inp, name):
            return self.linear(x, weight, bias), None
        group, offsets = groups[name], self.offsets[name]
        rank = None if inp.lora_groups is None else inp.lora_groups[name]
        if not beside:
            y = self.linear(x, weight, bias)
            buf = K.lora_shrink(x, group.a, group.ranks, group.pages, inp.lora, max_rank=rank)
            K.lora_expand(
                buf, group.b, group.ranks, group.pages, offsets, inp.lora, y,
                b_offsets=group.b_offsets,
            )  # fmt: skip
            return y, None
        delta = None
        if residual is None:  # allocated on the main stream, written beside
            delta = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        launch = self._decode_launch(x.shape[0], group, inp.lora) if inp.is_decode else {}
        with self._beside():  # no early launch beside the GEMM (lora_shrink's docstring)
            buf = K.lora_shrink(
                x, group.a, group.ranks, group.pages, inp.lora, early_launch=False,
                max_rank=rank, config=launch.get("shrink"),
            )  # fmt: skip
            out, acc = (residual, True) if delta is None else (delta, False)
            K.lora_expand(
                buf,
                group.b,
                group.ranks,
                group.pages,
                offsets,
                inp.lora,
                out,
                accumulate=acc,
                early_launch=False,
                b_offsets=group.b_offsets,
                config=launch.get("expand"),
            )
        y = self.linear(x, weight, bias)
        self._join()
        return y, delta

    def _qk_norm(
        self, qkv: torch.Tensor, delta: torch.Tensor | None, q_w: torch.Tensor, k_w: torch.Tensor
    ) -> torch.Tensor:
        """Qwen3: each q and k head RMS-normed (after the LoRA delta, before rotary)."""
        c = self.config
        if delta is not None:
            qkv = qkv + delta
        T, q, kv, d = qkv.shape[0], c.q_size, c.kv_size, c.head_dim
        qn = K.rms_norm(qkv[:, :q].reshape(T * c.num_heads, d), q_w, c.rms_norm_eps)
        kn = K.rms_norm(qkv[:, q : q + kv].reshape(T * c.num_kv_heads, d), k_w, c.rms_norm_eps)
        return torch.cat([qn.view(T, q), kn.view(T, kv), qkv[:, q + kv :]], 1)

    def forward(
        self,
        inp: ForwardInputs,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        lora: LoraPool | None,
    ) -> torch.Tensor:
        """-> final normed hidden states ``[T, H]``. Writes the step's K/V into ``kv_caches``.

        LoRA in decode steps runs beside the base GEMMs (``_beside``: the side stream on
        CUDA): the q/k/v and gate/up deltas go to buffers that the main stream adds after the
        GEMM (q/k/v inside the rotary + cache-write pass, gate/up inside SiLU-and-mul), the o
        and down deltas straight into the residual stream, which the GEMM does not touch. The
        small LoRA kernels then overlap the weight-bound GEMMs instead of queueing behind
        them. Prefill and mixed steps (large segments, tensor-core tiles) add in line after
        each GEMM.

        The forward is the sequence of pieces that :class:`PrefillGraphs` captures one by one
        (``prefill_graphs.py``): :meth:`embed`, then per layer :meth:`attn_in` (norm, q/k/v,
        rotary and the cache write), :meth:`attention` (the only op that reads the step's
        sequence lengths on the host) and :meth:`attn_out` (o, norm, MLP), then
        :meth:`final_norm`.
        """
        x, residual = self.embed(inp), None
        for i in range(len(self.weights.layers)):
            q, residual = self.attn_in(i, x, residual, inp, kv_caches, lora)
            attn = self.attention(i, q, inp, kv_caches)
            x, residual = self.attn_out(i, attn, residual, inp, lora)
        return self.final_norm(x, residual)

    def embed(self, inp: ForwardInputs) -> torch.Tensor:
        """The token embeddings ``[T, H]`` (scaled where the family says: Gemma)."""
        if self.tp is None:
            x = F.embedding(inp.input_ids, self.weights.embed)
        else:
            x = self.tp.embed(inp.input_ids, self.weights.embed)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        return x

    def _groups(
        self, inp: ForwardInputs, lora: LoraPool | None, i: int
    ) -> dict[str, LoraGroup] | None:
        return lora.layers[i] if lora is not None and inp.lora is not None else None

    def attn_in(
        self,
        i: int,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        inp: ForwardInputs,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        lora: LoraPool | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i`` up to its attention: the input norm (adding ``x`` into the residual
        stream; None: ``x`` starts it), q/k/v with their LoRA, rotary, K/V into the cache.
        -> ``(q [T, heads, head_dim], residual)``."""
        c, w = self.config, self.weights.layers[i]
        if residual is None:
            residual = x
            h = K.rms_norm(x, w.input_norm, c.rms_norm_eps)
        else:
            h, residual = K.rms_norm(x, w.input_norm, c.rms_norm_eps, residual)
        groups = self._groups(inp, lora, i)
        beside = groups is not None and inp.is_decode
        qkv, d = self._proj(h, w.qkv, groups, "qkv", inp, beside=beside, bias=w.qkv_bias)
        if w.q_norm is not None and w.k_norm is not None:
            qkv, d = self._qk_norm(qkv, d, w.q_norm, w.k_norm), None
        k_cache, v_cache = kv_caches[i]
        slot_mapping, g = inp.slot_mapping, self.kv_groups[i]
        if g:  # (its blocks are not the full layers': never write through their mapping)
            if inp.local_slot_mapping is None:
                raise ValueError(f"layer {i} reads local group {g}'s tables: none given")
            slot_mapping = inp.local_slot_mapping[g - 1]
        cos_sin = self.cos_sin
        if self.local_cos_sin is not None and c.sliding_layers[i]:
            cos_sin = self.local_cos_sin
        # + the q/k/v delta, rotary, and K/V into the cache: one pass
        q = K.rope_cache(
            qkv,
            inp.positions,
            cos_sin,
            k_cache,
            v_cache,
            slot_mapping,
            c.num_heads,
            c.num_kv_heads,
            delta=d,
        )
        return q, residual

    def attention(
        self,
        i: int,
        q: torch.Tensor,
        inp: ForwardInputs,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layer ``i``'s attention over the paged cache -> ``[T, q_size]``. ``out``
        (``[T, q_size]``, prefill and mixed steps): written in place and returned."""
        c = self.config
        k_cache, v_cache = kv_caches[i]
        window = self.windows[i]
        tables, g = inp.block_tables, self.kv_groups[i]
        if g:
            if inp.local_block_tables is None:
                raise ValueError(f"layer {i} reads local group {g}'s tables: none given")
            tables = inp.local_block_tables[g - 1]
        if inp.is_decode:
            attn = K.paged_decode_attention(
                q, k_cache, v_cache, tables, inp.context_lens, self.scale,
                window=window, softcap=self.softcap,
            )  # fmt: skip
        else:
            attn = K.prefill_attention(
                q,
                k_cache,
                v_cache,
                tables,
                inp.cu_q_lens,
                inp.context_lens,
                self.scale,
                max_q_len=inp.max_q_len,
                window=window,
                softcap=self.softcap,
                out=None if out is None else out.view(q.shape),
            )
        return attn.reshape(q.shape[0], c.q_size)

    def attn_out(
        self,
        i: int,
        attn: torch.Tensor,
        residual: torch.Tensor,
        inp: ForwardInputs,
        lora: LoraPool | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i`` after its attention: o with its LoRA, the post-attention norm, the MLP
        (or the experts). -> ``(x, residual)``: the layer's output, still to be added into
        the residual stream (by the next layer's input norm or :meth:`final_norm`)."""
        c, w, tp = self.config, self.weights.layers[i], self.tp
        groups = self._groups(inp, lora, i)
        beside = groups is not None and inp.is_decode
        if w.pre_ff_norm is not None:
            o = self._out(attn, w.o, groups, "o", inp, beside, w.post_norm)
            h, residual = K.rms_norm(o, w.pre_ff_norm, c.rms_norm_eps, residual)
        elif tp is not None:  # a partial sum (base + LoRA): summed, then the residual
            o = tp.all_reduce(self._partial(attn, w.o, groups, "o", inp, beside))
            h, residual = K.rms_norm(o, w.post_norm, c.rms_norm_eps, residual)
        else:
            o, _ = self._proj(attn, w.o, groups, "o", inp, beside=beside, residual=residual)
            h, residual = K.rms_norm(o, w.post_norm, c.rms_norm_eps, residual)
        if w.router is not None:  # the experts and their LoRA (engine/model/moe.py)
            ex = {g: v for g, v in (groups or {}).items() if g.startswith("experts_")}
            ex = {g: v for g, v in ex.items() if self._uses(inp, g)}
            gate_up, down = cast(torch.Tensor, w.gate_up), cast(torch.Tensor, w.down)
            lm = inp.lora
            grouped = lm is not None and bool(ex) and expert_grouped(lm, c, inp.is_decode)
            x = moe_mlp(
                h, w.router, gate_up, down, c, ex, self.offsets, inp.lora, grouped=grouped,
                beside=beside and self.moe_lora_beside, side_stream=self.side_stream,
                fuse_act=self.fuse_lora_act,
            )  # fmt: skip
            return x, residual
        act = self._gate_up_act(h, w.gate_up, groups, inp, beside)
        if w.post_ff_norm is not None:
            x = self._out(act, w.down, groups, "down", inp, beside, w.post_ff_norm)
        elif tp is not None:
            x = tp.all_reduce(self._partial(act, w.down, groups, "down", inp, beside))
        else:
            x, _ = self._proj(act, w.down, groups, "down", inp, beside=beside, residual=residual)
        return x, residual

    def _gate_up_act(
        self,
        h: torch.Tensor,
        weight: Weight,
        groups: dict[str, LoraGroup] | None,
        inp: ForwardInputs,
        beside: bool,
    ) -> torch.Tensor:
        """gate/up with its LoRA, then the gated activation. A step whose LoRA runs in line
        on the segment path (prefill and mixed steps) takes the fused kernel
        (``lora_silu_and_mul``: the expand's delta added inside the activation, so the GEMM's
        ``[T, 2I]`` output is read once instead of read, rewritten and read again)."""
        lm = inp.lora
        if (
            self.fuse_lora_act
            and not beside
            and groups is not None
            and lm is not None
            and self._uses(inp, "gate_up")
            and not use_token_path(h.shape[0], lm)
        ):
            group = groups["gate_up"]
            rank = None if inp.lora_groups is None else inp.lora_groups["gate_up"]
            gu = self.linear(h, weight)
            buf = K.lora_shrink(h, group.a, group.ranks, group.pages, lm, max_rank=rank)
            return K.lora_silu_and_mul(
                gu, buf, group.b, group.ranks, group.b_table, lm, self.gelu, group.b_offsets
            )
        gu, d = self._proj(h, weight, groups, "gate_up", inp, beside=beside)
        return K.silu_and_mul(gu, d, gelu=self.gelu)

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The last layer's output added into the residual stream, then the final norm."""
        out, _ = K.rms_norm(x, self.weights.norm, self.config.rms_norm_eps, residual)
        return out

    def _partial(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        groups: dict[str, LoraGroup] | None,
        name: str,
        inp: ForwardInputs,
        beside: bool,
    ) -> torch.Tensor:
        """A row-parallel projection's partial sum on this rank: its input columns of the
        base GEMM plus its rows of the adapters' A (shrink) expanded by the whole B. Summed
        over the ranks this is the whole projection and its LoRA: the shrink needs no
        collective of its own."""
        y, delta = self._proj(x, weight, groups, name, inp, beside=beside)
        return y if delta is None else y.add_(delta)

    def _out(
        self,
        x: torch.Tensor,
        weight: Weight,
        groups: dict[str, LoraGroup] | None,
        name: str,
        inp: ForwardInputs,
        beside: bool,
        norm: torch.Tensor,
    ) -> torch.Tensor:
        """Gemma: a block's output projection (+ its LoRA delta), RMS-normed by ``norm``;
        the caller adds it to the residual stream (inside the next norm). Tensor-parallel:
        the partial sums are summed over the ranks before the norm."""
        y, delta = self._proj(x, weight, groups, name, inp, beside=beside)
        if delta is not None:
            y = y + delta
        if self.tp is not None:
            y = self.tp.all_reduce(y)
        return K.rms_norm(y, norm, self.config.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` -> float32 ``[N, V]`` (soft-capped where the model says: Gemma 2).
        Tensor-parallel: on rank 0; the other ranks get their vocabulary slice."""
        logits = F.linear(hidden, self.weights.lm_head).float()
        if self.tp is not None:
            logits = self.tp.gather_vocab(logits)
        cap = self.config.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
