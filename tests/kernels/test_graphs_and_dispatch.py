"""CUDA-graph replay equals eager (static buffers refilled per step); dispatch picks a side."""

from __future__ import annotations

import torch
from kernel_testing import assert_close, gpu
from test_attention import make_cache
from test_lora_sgmv import make_token_slot, make_weights, to_paged

import loraplex.engine.kernels as K
from loraplex.engine.kernels import build_lora_meta


def test_dispatch_ref_on_cpu(monkeypatch):
    monkeypatch.delenv("LORAPLEX_KERNELS", raising=False)
    assert not K.use_triton(torch.zeros(1))
    monkeypatch.setenv("LORAPLEX_KERNELS", "ref")
    x = torch.randn(3, 8)
    assert torch.equal(K.silu_and_mul(x), K.silu_and_mul.__globals__["_silu"].silu_and_mul_ref(x))


@gpu
def test_sgmv_graph_replay_matches_eager():
    gen = torch.Generator().manual_seed(0)
    T, k, outs, slots = 24, 4096, [4096, 1024, 1024], 16
    a, b, ranks, offsets = make_weights(slots, outs, 64, k, torch.bfloat16, gen, (8, 16, 64))
    # the pool's layout: pages of 8 rank rows in random places
    a, b, pages, boffs = to_paged(a, b, offsets, gen)
    ranks = ranks.cuda()
    x = torch.zeros(T, k, dtype=torch.bfloat16, device="cuda")
    y = torch.zeros(T, sum(outs), dtype=torch.bfloat16, device="cuda")
    static = build_lora_meta(make_token_slot(T, "zipf", slots, gen), max_segments=slots).to("cuda")

    def step():
        buf = K.lora_shrink(x, a, ranks, pages, static)
        K.lora_expand(buf, b, ranks, pages, offsets, static, y, b_offsets=boffs)

    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for pattern in ("distinct", "identical", "zipf", "some_none"):
        ts = make_token_slot(T, pattern, slots, gen)
        meta = build_lora_meta(ts, max_segments=slots).to("cuda")
        static.copy_(meta)
        x.copy_(torch.randn(T, k, generator=gen).to(torch.bfloat16))
        y0 = torch.randn(T, sum(outs), generator=gen).to(torch.bfloat16)
        y.copy_(y0)
        g.replay()
        got = y.clone()
        y.copy_(y0)
        buf = K.lora_shrink(x, a, ranks, pages, meta)
        K.lora_expand(buf, b, ranks, pages, offsets, meta, y, b_offsets=boffs)
        assert_close(got, y, torch.bfloat16, tol=1e-2)


@gpu
def test_decode_graph_replay_matches_eager():
    gen = torch.Generator().manual_seed(0)
    lens = [100, 7, 300, 1]
    kc, vc, bt = (t.cuda() for t in make_cache(lens, 16, 8, 128, torch.bfloat16, gen))
    q = torch.randn(4, 32, 128, generator=gen).to(torch.bfloat16).cuda()
    cl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = K.paged_decode_attention(q, kc, vc, bt, cl, 128**-0.5)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = K.paged_decode_attention(q, kc, vc, bt, cl, 128**-0.5)
    cl.copy_(torch.tensor([50, 8, 290, 1], dtype=torch.int32))
    q.copy_(torch.randn(4, 32, 128, generator=gen).to(torch.bfloat16))
    g.replay()
    out = K.paged_decode_attention(q, kc, vc, bt, cl, 128**-0.5)
    assert torch.equal(static_out, out)
