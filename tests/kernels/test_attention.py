"""Paged decode and prefill attention vs the torch references (which gather by block table)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, assert_close, gpu

from loraplex.engine.kernels.kv_cache_write import FP8_KV
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


def fp8_caches(kc, vc, scale=3.0):
    """The caches in e4m3 (values spread over its exponents), and their float32 values."""
    k8, v8 = (kc.float() * scale).to(FP8_KV), (vc.float() * scale).to(FP8_KV)
    return k8, v8, k8.float(), v8.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [1, 3])
def test_paged_decode_fp8_cache(case, dtype):
    """An e4m3 cache (``--kv-cache-dtype fp8``): the kernel widens K and V to the query's
    dtype in registers; the same values as a float32 cache."""
    lens, bs, hq, hkv, d = DECODE_CASES[case]
    gen = torch.Generator().manual_seed(50 + case)
    kc, vc, bt = make_cache(lens, bs, hkv, d, torch.float32, gen)
    k8, v8, kf, vf = fp8_caches(kc, vc)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    cl = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q.float(), kf, vf, bt, cl, d**-0.5)
    assert torch.equal(paged_decode_attention_ref(q.float(), k8, v8, bt, cl, d**-0.5), ref)
    dv = DEVICE
    out = paged_decode_attention(q.to(dv), k8.to(dv), v8.to(dv), bt.to(dv), cl.to(dv), d**-0.5)
    assert_close(out, ref, dtype, tol=2e-5 if dtype == torch.float32 else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_fp8_cache(dtype):
    qlens, cached, bs, hq, hkv, d = PREFILL_CASES[2]
    gen = torch.Generator().manual_seed(60)
    lens = [a + b for a, b in zip(qlens, cached, strict=True)]
    kc, vc, bt = make_cache(lens, bs, hkv, d, torch.float32, gen)
    k8, v8, kf, vf = fp8_caches(kc, vc)
    q = torch.randn(sum(qlens), hq, d, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    cl = torch.tensor(lens, dtype=torch.int32)
    ref = prefill_attention_ref(q.float(), kf, vf, bt, cu, cl, d**-0.5)
    assert torch.equal(prefill_attention_ref(q.float(), k8, v8, bt, cu, cl, d**-0.5), ref)
    dv = DEVICE
    args = (q.to(dv), k8.to(dv), v8.to(dv), bt.to(dv), cu.to(dv), cl.to(dv), d**-0.5)
    out = prefill_attention(*args, max_q_len=max(qlens))
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


# Gemma's layer options: a sliding window (keys in (pos - window, pos]) and soft-capped
# scores; windows shorter and longer than the contexts, splits that start inside the window
WINDOW_DECODE = [  # (context lens, block_size, Hq, Hkv, D, window, softcap)
    ([5, 17, 33], 4, 4, 2, 32, 6, 0.0),
    ([40, 1, 9], 8, 4, 1, 16, 16, 2.5),
    ([70, 20], 4, 2, 2, 32, 0, 1.5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(WINDOW_DECODE)))
@pytest.mark.parametrize("splits", [None, 3])
def test_paged_decode_window_softcap(case, dtype, splits):
    lens, bs, hq, hkv, d, window, cap = WINDOW_DECODE[case]
    gen = torch.Generator().manual_seed(20 + case)
    kc, vc, bt = make_cache(lens, bs, hkv, d, dtype, gen)
    q = (3 * torch.randn(len(lens), hq, d, generator=gen)).to(dtype)  # scores past the cap
    cl = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, cl, 0.2, window, cap)
    full = paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, cl, 0.2)
    assert (ref - full).abs().max() > 0.05  # the options change the result
    dv = DEVICE
    out = paged_decode_attention(
        q.to(dv), kc.to(dv), vc.to(dv), bt.to(dv), cl.to(dv), 0.2,
        window=window, softcap=cap, num_splits=splits,
    )  # fmt: skip
    assert_close(out, ref, dtype, tol=2e-5 if dtype == torch.float32 else None)


WINDOW_PREFILL = [  # (new lens, cached lens, block_size, Hq, Hkv, D, window, softcap)
    ([3, 21], [0, 9], 4, 4, 2, 32, 5, 0.0),
    ([40, 1], [0, 30], 8, 2, 1, 16, 17, 3.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(WINDOW_PREFILL)))
def test_prefill_window_softcap(case, dtype):
    qlens, cached, bs, hq, hkv, d, window, cap = WINDOW_PREFILL[case]
    gen = torch.Generator().manual_seed(30 + case)
    lens = [a + b for a, b in zip(qlens, cached, strict=True)]
    kc, vc, bt = make_cache(lens, bs, hkv, d, dtype, gen)
    q = (3 * torch.randn(sum(qlens), hq, d, generator=gen)).to(dtype)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    cl = torch.tensor(lens, dtype=torch.int32)
    args = (q.float(), kc.float(), vc.float(), bt, cu, cl, 0.2)
    ref = prefill_attention_ref(*args, window=window, softcap=cap)
    assert (ref - prefill_attention_ref(*args)).abs().max() > 0.05
    dv = DEVICE
    args = (q.to(dv), kc.to(dv), vc.to(dv), bt.to(dv), cu.to(dv), cl.to(dv), 0.2)
    out = prefill_attention(*args, max_q_len=max(qlens), window=window, softcap=cap)
    assert_close(out, ref, dtype, tol=2e-5 if dtype == torch.float32 else None)


def test_window_softcap_refs_match_a_dense_mask():
    """The references against a dense computation written out (transformers' eager Gemma
    attention: scores * scale, capped, then the causal sliding-window mask)."""
    gen = torch.Generator().manual_seed(3)
    n, window, cap, scale = 11, 4, 2.0, 0.3
    kc, vc, bt = make_cache([n], 4, 1, 8, torch.float32, gen)
    q = 3 * torch.randn(n, 2, 8, generator=gen)
    k = kc[bt[0, :3].long()].reshape(12, 1, 8)[:n].expand(n, 2, 8)
    v = vc[bt[0, :3].long()].reshape(12, 1, 8)[:n].expand(n, 2, 8)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = torch.tanh(s / cap) * cap
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    s = s.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
    want = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
    cu, cl = torch.tensor([0, n], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    got = prefill_attention_ref(q, kc, vc, bt, cu, cl, scale, window=window, softcap=cap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    last = paged_decode_attention_ref(q[-1:], kc, vc, bt, cl, scale, window, cap)
    torch.testing.assert_close(last[0], want[-1], rtol=1e-5, atol=1e-5)


@gpu
def test_window_softcap_gemma_bf16():
    """Gemma 2 9B's heads (16 q, 8 kv, 256 dims), window 4096 at contexts past it."""
    lens = [5000, 300, 4097]
    gen = torch.Generator().manual_seed(4)
    kc, vc, bt = make_cache(lens, 16, 8, 256, torch.bfloat16, gen)
    q = torch.randn(len(lens), 16, 256, generator=gen).to(torch.bfloat16)
    cl = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, cl, 0.0625, 4096, 50.0)
    out = paged_decode_attention(
        q.cuda(), kc.cuda(), vc.cuda(), bt.cuda(), cl.cuda(), 0.0625, window=4096, softcap=50.0
    )
    assert_close(out, ref, torch.bfloat16)
    qlens, cached = [700, 9], [4000, 4500]
    lens = [a + b for a, b in zip(qlens, cached, strict=True)]
    kc, vc, bt = make_cache(lens, 16, 8, 256, torch.bfloat16, gen)
    q = torch.randn(sum(qlens), 16, 256, generator=gen).to(torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    cl = torch.tensor(lens, dtype=torch.int32)
    ref = prefill_attention_ref(
        q.float(), kc.float(), vc.float(), bt, cu, cl, 0.0625, window=4096, softcap=50.0
    )
    out = prefill_attention(
        q.cuda(), kc.cuda(), vc.cuda(), bt.cuda(), cu.cuda(), cl.cuda(), 0.0625,
        max_q_len=700, window=4096, softcap=50.0,
    )  # fmt: skip
    assert_close(out, ref, torch.bfloat16)
