"""Paged decode and prefill attention vs the torch references (which gather by block table)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, assert_close, gpu

from loraplex.engine.kernels.paged_decode_attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
)
from loraplex.engine.kernels.prefill_attention import prefill_attention, prefill_attention_ref


def make_cache(ctx_lens, block_size, hkv, d, dtype, gen, extra_blocks=3):
    """Random paged caches and shuffled block tables for sequences of the given lengths."""
    need = [(n + block_size - 1) // block_size for n in ctx_lens]
    nb = sum(need) + extra_blocks
    k_cache = torch.randn(nb, block_size, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(nb, block_size, hkv, d, generator=gen).to(dtype)
    perm = torch.randperm(nb, generator=gen)
    mb = max(need) + 1
    bt = torch.zeros(len(ctx_lens), mb, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[i : i + n]
        i += n
    return k_cache, v_cache, bt


DECODE_CASES = [  # (context lens, block_size, Hq, Hkv, D)
    ([1], 16, 4, 1, 64),
    ([5, 17, 33], 16, 8, 2, 64),
    ([133, 7, 1, 64, 200], 8, 4, 4, 32),
    ([300, 45], 16, 6, 2, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_paged_decode(case, dtype, splits):
    lens, bs, hq, hkv, d = DECODE_CASES[case]
    gen = torch.Generator().manual_seed(case)
    kc, vc, bt = make_cache(lens, bs, hkv, d, dtype, gen)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    cl = torch.tensor(lens, dtype=torch.int32)
    scale = d**-0.5
    ref = paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, cl, scale)
    dv = DEVICE
    out = paged_decode_attention(
        q.to(dv), kc.to(dv), vc.to(dv), bt.to(dv), cl.to(dv), scale, num_splits=splits
    )
    assert_close(out, ref, dtype, tol=2e-5 if dtype == torch.float32 else None)


PREFILL_CASES = [  # (new lens, cached lens, block_size, Hq, Hkv, D)
    ([1], [0], 16, 4, 1, 64),
    ([3, 7], [0, 5], 16, 8, 2, 64),
    ([133, 1, 20], [0, 40, 13], 8, 4, 2, 32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
@pytest.mark.parametrize("host_max", [False, True])
def test_prefill(case, dtype, host_max):
    qlens, cached, bs, hq, hkv, d = PREFILL_CASES[case]
    gen = torch.Generator().manual_seed(10 + case)
    lens = [a + b for a, b in zip(qlens, cached, strict=True)]
    kc, vc, bt = make_cache(lens, bs, hkv, d, dtype, gen)
    q = torch.randn(sum(qlens), hq, d, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    cl = torch.tensor(lens, dtype=torch.int32)
    scale = d**-0.5
    ref = prefill_attention_ref(q.float(), kc.float(), vc.float(), bt, cu, cl, scale)
    dv = DEVICE
    # max_q_len given by the host (as the runner does: no device read-back) or derived
    max_q = max(qlens) if host_max else None
    args = (q.to(dv), kc.to(dv), vc.to(dv), bt.to(dv), cu.to(dv), cl.to(dv), scale)
    out = prefill_attention(*args, max_q_len=max_q)
    assert_close(out, ref, dtype, tol=2e-5 if dtype == torch.float32 else None)


def test_prefill_ref_matches_sdpa():
    # the reference itself: no cache prefix equals torch's causal SDPA with GQA
    gen = torch.Generator().manual_seed(0)
    kc, vc, bt = make_cache([9], 4, 2, 16, torch.float32, gen)
    q = torch.randn(9, 4, 16, generator=gen)
    cu, cl = torch.tensor([0, 9], dtype=torch.int32), torch.tensor([9], dtype=torch.int32)
    out = prefill_attention_ref(q, kc, vc, bt, cu, cl, 0.25)
    k = kc[bt[0, :3].long()].reshape(12, 2, 16)[:9]
    v = vc[bt[0, :3].long()].reshape(12, 2, 16)[:9]
    exp = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        is_causal=True, scale=0.25, enable_gqa=True,
    ).transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("lens", [[1, 4096], [512] * 64, [37, 1000, 2049, 8]])
def test_paged_decode_llama_bf16(lens):
    gen = torch.Generator().manual_seed(1)
    kc, vc, bt = make_cache(lens, 16, 8, 128, torch.bfloat16, gen)
    q = torch.randn(len(lens), 32, 128, generator=gen).to(torch.bfloat16)
    cl = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, cl, 128**-0.5)
    out = paged_decode_attention(q.cuda(), kc.cuda(), vc.cuda(), bt.cuda(), cl.cuda(), 128**-0.5)
    assert_close(out, ref, torch.bfloat16)


@gpu
def test_prefill_llama_bf16():
    qlens, cached = [512, 7, 1000], [0, 300, 64]
    lens = [a + b for a, b in zip(qlens, cached, strict=True)]
    gen = torch.Generator().manual_seed(2)
    kc, vc, bt = make_cache(lens, 16, 8, 128, torch.bfloat16, gen)
    q = torch.randn(sum(qlens), 32, 128, generator=gen).to(torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    cl = torch.tensor(lens, dtype=torch.int32)
    ref = prefill_attention_ref(q.float(), kc.float(), vc.float(), bt, cu, cl, 128**-0.5)
    out = prefill_attention(
        q.cuda(), kc.cuda(), vc.cuda(), bt.cuda(), cu.cuda(), cl.cuda(), 128**-0.5
    )
    assert_close(out, ref, torch.bfloat16)
