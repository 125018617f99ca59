"""The gate/up LoRA expand fused into the gated activation, against the unfused references."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, assert_close, gpu
from test_lora_sgmv import PATTERNS, make_token_slot, make_weights, shrink_ref, to_paged

from loraplex.engine.kernels import build_lora_meta
from loraplex.engine.kernels.lora_expand import lora_expand_ref
from loraplex.engine.kernels.lora_shrink import lora_shrink
from loraplex.engine.kernels.lora_silu_and_mul import lora_silu_and_mul, lora_silu_and_mul_ref
from loraplex.engine.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref


def one_page_each(num_slots: int) -> torch.Tensor:
    return torch.arange(num_slots, dtype=torch.int32)[:, None, None].expand(-1, 2, 1).contiguous()


def run_fused(
    T, k, inner, pattern, dtype, *, num_slots=8, max_rank=64, seed=0, gelu=False,
    max_segments=None, step_rank=None, nan_past_rank=False, rank_choices=(1, 8, 64),
):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    token_slot = make_token_slot(T, pattern, num_slots, gen)
    if max_segments is not None and T > 1:
        token_slot[-1] = -1  # a graph's padding row
    a, b, ranks, offsets = make_weights(
        num_slots, [inner, inner], max_rank, k, dtype, gen, rank_choices=rank_choices
    )
    if nan_past_rank:  # a page's rows past an adapter's rank may hold anything
        for sl in range(num_slots):
            for p in range(2):
                r = int(ranks[sl, p])
                a[sl, p, r:] = float("nan")
                b[sl, offsets[p] : offsets[p + 1], r:] = float("nan")
    x = torch.randn(T, k, generator=gen).to(dtype)
    gu = (torch.randn(T, 2 * inner, generator=gen) * 2).to(dtype)
    meta = build_lora_meta(token_slot, max_segments=max_segments)

    # golden: float32 throughout, the unfused ops (expand into the GEMM output, then act)
    buf_ref = shrink_ref(x.float(), a.float(), ranks, meta)
    delta = torch.zeros(T, 2 * inner)
    pages_ref = one_page_each(num_slots)
    lora_expand_ref(buf_ref, b.float(), ranks, pages_ref, offsets, meta, delta)
    want = silu_and_mul_ref(gu.float(), delta, gelu=gelu)

    A, B, pages, boffs = to_paged(a, b, offsets, gen)
    meta_d, rk = meta.to(DEVICE), ranks.to(DEVICE)
    buf = lora_shrink(x.to(DEVICE), A, rk, pages, meta_d, max_rank=step_rank)
    out = lora_silu_and_mul(gu.to(DEVICE), buf, B, rk, pages, meta_d, gelu, boffs)
    assert out.dtype == dtype and out.shape == (T, inner)
    assert_close(out, want, dtype)
    # the reference op (the CPU engine's) on the same partials and paged weights
    ref = lora_silu_and_mul_ref(gu.to(DEVICE), buf, B, rk, pages, meta_d, gelu, boffs)
    assert_close(ref, want, dtype)
    none = token_slot < 0  # rows without an adapter: the unfused kernel's, bit for bit
    plain = silu_and_mul(gu.to(DEVICE), gelu=gelu).cpu()
    assert torch.equal(out.cpu()[none], plain[none])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("T", [1, 5, 40])
def test_fused_matches_expand_then_activation(T, pattern, dtype):
    run_fused(T, 48, 72, pattern, dtype, seed=T)


@pytest.mark.parametrize("gelu", [False, True])
def test_fused_geglu_and_graph_padded_meta(gelu):
    # a decode/prefill graph's meta: segments and tiles padded to the slot count, a padding row
    run_fused(37, 32, 40, "zipf", torch.float32, gelu=gelu, max_segments=8, seed=3)


@pytest.mark.parametrize("step_rank", [8, 16, 40])
def test_fused_reads_the_step_rank_width(step_rank):
    # the segment path's partials sized by the step's largest rank (16, 16, 48 wide), in a
    # rank-64 pool whose rows past each adapter's rank hold NaN
    choices = tuple(r for r in (4, 8, 16, 40) if r <= step_rank)
    run_fused(
        50, 32, 40, "zipf", torch.float32, step_rank=step_rank, nan_past_rank=True,
        rank_choices=choices, seed=step_rank,
    )  # fmt: skip


def test_fused_rank_8_pool_and_no_adapter_at_all():
    run_fused(24, 32, 40, "distinct", torch.float32, max_rank=8, rank_choices=(2, 8), seed=5)
    gen = torch.Generator().manual_seed(0)
    gu = torch.randn(6, 80, generator=gen)
    meta = build_lora_meta(torch.full((6,), -1, dtype=torch.int32))
    a, b, ranks, offsets = make_weights(4, [40, 40], 16, 8, torch.float32, gen)
    _, B, pages, boffs = to_paged(a, b, offsets, gen)
    gu, meta, ranks = gu.to(DEVICE), meta.to(DEVICE), ranks.to(DEVICE)
    buf = torch.zeros(1, 2, 6, 16, device=DEVICE)
    out = lora_silu_and_mul(gu, buf, B, ranks, pages, meta, False, boffs)
    assert torch.equal(out, silu_and_mul(gu))


def test_fused_refuses_a_group_that_is_not_gate_up():
    gen = torch.Generator().manual_seed(0)
    a, b, ranks, offsets = make_weights(4, [40, 40, 40], 16, 8, torch.float32, gen)
    _, B, pages, _ = to_paged(a, b, offsets, gen)
    meta = build_lora_meta(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="gu must be"):
        lora_silu_and_mul(torch.zeros(4, 80), torch.zeros(1, 3, 4, 16), B, ranks, pages, meta)


@gpu
@pytest.mark.parametrize("pattern", ["zipf", "some_none", "distinct"])
@pytest.mark.parametrize("T", [64, 257, 2048])
def test_fused_llama_bf16(T, pattern):
    run_fused(
        T, 4096, 14336, pattern, torch.bfloat16, num_slots=16, max_rank=64, seed=T,
        rank_choices=(8, 16, 64), step_rank=64,
    )  # fmt: skip
