"""The FP8 linear kernels vs the dequantizing reference: the weight-only GEMM in the
interpreter (float8 tensors load and widen exactly there) on small odd shapes, per-channel and
block scales, K splits, bias; on GPU the same in bf16 at Llama sizes, W8A8 through
``torch._scaled_mm``, the per-token quantization pass, the dispatch, and graph replay."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, assert_close, gpu

from loraplex.engine import kernels as K
from loraplex.engine.kernels.fp8_linear import (
    A8_MAX_TOKENS,
    FP8,
    _counts,
    default_w8a16_config,
    dequantize,
    fp8_candidates,
    fp8_linear_a8_ref,
    fp8_linear_ref,
    fp8_linear_w8a8,
    fp8_linear_w8a16,
    fp8_mode,
    quantize_rows,
    quantize_rows_ref,
)
from loraplex.engine.model.fp8 import quantize_per_channel


def make_weight(N, K, block, gen, device=DEVICE):
    """A random e4m3 weight with per-channel [N] or block [NB, KB] float32 scales."""
    q = (torch.randn(N, K, generator=gen) * 100).clamp(-448, 448).to(FP8)
    if block is None:
        scale = torch.rand(N, generator=gen) * 1e-3 + 1e-4
    else:
        scale = torch.rand(-(-N // block[0]), -(-K // block[1]), generator=gen) * 1e-3 + 1e-4
    return q.to(device), scale.to(device)


INTERP_CFGS = [
    None,  # the defaults (interpreter: 16-wide tiles)
    {"block_m": 16, "block_n": 32, "block_k": 16, "split": 3, "num_warps": 4},
    # the transposed tile (W x^T), whole and split
    {"block_m": 16, "block_n": 32, "block_k": 16, "split": 1, "num_warps": 4, "swap": 1},
    {"block_m": 16, "block_n": 16, "block_k": 16, "split": 2, "num_warps": 4, "swap": 1},
    # K split whose last split reduces (arrival counters), both orientations
    {"block_m": 16, "block_n": 16, "block_k": 16, "split": 3, "num_warps": 4, "fixup": 1},
    {
        "block_m": 16,
        "block_n": 16,
        "block_k": 16,
        "split": 2,
        "num_warps": 4,
        "swap": 1,
        "fixup": 1,
    },
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "M,N,K,block",
    [(1, 40, 96, None), (3, 33, 80, (16, 32)), (17, 64, 48, None), (7, 48, 64, (16, 16))],
)
@pytest.mark.parametrize("cfg", INTERP_CFGS)
def test_w8a16_matches_reference(M, N, K, block, dtype, cfg):
    gen = torch.Generator().manual_seed(M * 1000 + N)
    q, scale = make_weight(N, K, block, gen)
    x = torch.randn(M, K, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(N, generator=gen).to(dtype).to(DEVICE)
    ref = fp8_linear_ref(x.float(), q, scale, block, bias.float())
    out = fp8_linear_w8a16(x, q, scale, block, bias, cfg)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    assert_close(fp8_linear_w8a16(x, q, scale, block, None, cfg), ref - bias.float(), dtype)


def test_w8a16_refuses_bad_scales():
    gen = torch.Generator().manual_seed(0)
    q, scale = make_weight(32, 32, None, gen)
    x = torch.randn(2, 32).to(DEVICE)
    with pytest.raises(ValueError, match="per-channel"):
        fp8_linear_w8a16(x, q, scale[:16])
    with pytest.raises(ValueError, match="block scale"):
        fp8_linear_w8a16(x, q, scale, (16, 16))
    with pytest.raises(ValueError, match="e4m3"):
        fp8_linear_w8a16(x, q.float(), scale)


def test_dispatch_on_cpu_is_the_reference(monkeypatch):
    """Without Triton on the tensor's device (CPU, no override) the op dequantizes."""
    monkeypatch.setenv("LORAPLEX_KERNELS", "ref")
    gen = torch.Generator().manual_seed(1)
    q, scale = make_weight(24, 40, None, gen, "cpu")
    x = torch.randn(5, 40, generator=gen)
    out = K.fp8_linear(x, q, scale, None, None, w8a8_min_tokens=1)
    assert torch.equal(out, fp8_linear_ref(x, q, scale))


def test_quantize_rows_reference():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 70, generator=gen) * torch.logspace(-3, 2, 5)[:, None]
    q, s = quantize_rows_ref(x, 16)
    assert q.shape == (16, 70) and s.shape == (16, 1) and q.dtype == FP8
    back = q.float()[:5] * s[:5]
    # e4m3: 3 mantissa bits, round to nearest -> at most 1/16 relative, plus the subnormal step
    assert ((back - x).abs() <= x.abs() / 16 + s[:5] * 2**-10 + 1e-12).all()
    assert (q.float()[:5].abs().amax(1) == 448).all()
    assert (q.float()[5:] == 0).all()


def test_default_configs_fill_the_device():
    """Few N tiles (o, down of an 8B model): K split until 1.5 waves, its last split reducing;
    many (gate_up): no split."""
    cfg = default_w8a16_config(1, 4096, 14336, None, True, 132)
    assert 2 * (4096 // cfg["block_n"]) * cfg["split"] >= 3 * 132 and cfg["fixup"] == 1
    cfg = default_w8a16_config(1, 28672, 4096, None, True, 132)
    assert cfg["split"] == 1 and cfg["fixup"] == 0
    cfg = default_w8a16_config(64, 4096, 4096, (128, 128), True, 66)
    assert 128 % cfg["block_k"] == 0 and cfg["block_m"] == 64
    assert default_w8a16_config(2048, 4096, 4096, (64, 64), True, 132)["block_k"] == 64
    assert default_w8a16_config(16, 4096, 4096, (64, 64), True, 132)["block_k"] == 64
    a8 = default_w8a16_config(32, 4096, 4096, None, True, 132, a8=True)
    assert (a8["a8"], a8["swap"], a8["block_m"], a8["fixup"]) == (1, 1, 32, 1)
    # candidates for block scales step a divisor of the block
    assert all(64 % c["block_k"] == 0 for c in fp8_candidates(8, (64, 64)))
    small = fp8_candidates(8, (16, 16))
    assert small and all(c["block_k"] == 16 for c in small)
    assert all(
        c["a8"] == 1 and c["fixup"] == (c["split"] > 1) for c in fp8_candidates(32, None, True)
    )
    assert not any(c["a8"] for c in fp8_candidates(32, None))
    # every candidate's pipeline fits an SM's shared memory (the H200 refused 288 KiB ones)
    for m, a8, blk in ((1, False, None), (32, True, None), (64, False, None), (200, False, None),
                       (200, False, (128, 128))):  # fmt: skip
        for c in fp8_candidates(m, blk, a8):
            st = c["num_stages"]
            assert st * (c["block_m"] * c["block_k"] * 2 + c["block_n"] * c["block_k"]) <= 192 << 10


def test_modes_by_token_count():
    bf = torch.bfloat16
    assert [fp8_mode(m, None, bf, 1) for m in (1, 32, 33, 4096)] == ["a8", "a8", "w8a8", "w8a8"]
    assert [fp8_mode(m, None, bf, 128) for m in (1, 127, 128)] == ["w8a16", "w8a16", "w8a8"]
    assert fp8_mode(8, (128, 128), bf, 1) == "w8a16"  # block scales: weight-only
    assert fp8_mode(8, None, torch.float16, 1) == "w8a16"


# ---- GPU: bf16 at real sizes -----------------------------------------------------------------

LLAMA8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@gpu
@pytest.mark.parametrize("N,K", LLAMA8B)
@pytest.mark.parametrize("M", [1, 32, 200])
@pytest.mark.parametrize("block", [None, (128, 128)])
def test_gpu_w8a16_bf16(M, N, K, block):
    if not _fp8_gpu():
        pytest.skip("FP8 needs compute capability >= 8.9")
    gen = torch.Generator().manual_seed(M + N)
    q, scale = make_weight(N, K, block, gen, "cuda")
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16).cuda()
    ref = fp8_linear_ref(x.float(), q, scale, block)
    assert_close(fp8_linear_w8a16(x, q, scale, block), ref, torch.bfloat16)
    bm = 16 if M <= 16 else 32 if M <= 32 else 128
    swapped = [  # the transposed tile (W x^T), whole and split over K
        {"block_m": bm, "block_n": bn, "block_k": 128, "split": split, "num_warps": 4,
         "num_stages": 4, "swap": 1}
        for bn, split in ((64, 1), (128, 2))
    ]  # fmt: skip
    for cfg in [*fp8_candidates(M, block)[:2], *swapped]:
        assert_close(fp8_linear_w8a16(x, q, scale, block, None, cfg), ref, torch.bfloat16)


@gpu
@pytest.mark.parametrize("M", [1, 16, 37, 256])
def test_gpu_w8a8_and_row_quant(M):
    if not _fp8_gpu():
        pytest.skip("FP8 needs compute capability >= 8.9")
    gen = torch.Generator().manual_seed(M)
    w = torch.randn(4096, 4096, generator=gen).cuda() * 0.02
    fw = quantize_per_channel(w.to(torch.bfloat16))
    x = torch.randn(M, 4096, generator=gen).to(torch.bfloat16).cuda()
    q, s = quantize_rows(x)
    qr, sr = quantize_rows_ref(x, 16)
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    # the same code, or its neighbour where the kernel's x / s rounds a tie the other way
    qf, qrf = q.float(), qr.float()
    assert ((qf - qrf).abs() <= qrf.abs() / 8 + 2**-9).all()
    assert (qf != qrf).float().mean() < 0.01
    bias = torch.randn(4096, generator=gen).to(torch.bfloat16).cuda()
    ref = fp8_linear_ref(x.float(), fw.qweight, fw.scale, None, bias.float())
    out = fp8_linear_w8a8(x, fw.qweight, fw.scale, bias)
    # element by element against the same GEMM on the reference's quantized activations
    # (on the H200, against unquantized ones, 7-81 elements of up to 1M were 0.11-0.17 off:
    # that is the activations' rounding, e4m3's 1/16 step, not the kernel)
    xq = (qrf * sr)[:M]
    assert_close(
        out, fp8_linear_ref(xq, fw.qweight, fw.scale, None, bias.float()), torch.bfloat16, tol=0.1
    )
    # and the whole, activation rounding included, close to the unquantized product
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    # the dispatch: weight-only below the threshold, FP8 activations from it (quantized in
    # the Triton GEMM up to A8_MAX_TOKENS, for _scaled_mm past that)
    small = K.fp8_linear(x, fw.qweight, fw.scale, None, bias, w8a8_min_tokens=M + 1)
    assert_close(small, ref, torch.bfloat16)
    big = K.fp8_linear(x, fw.qweight, fw.scale, None, bias, w8a8_min_tokens=M)
    if M > A8_MAX_TOKENS:
        assert torch.equal(big, out)
    else:
        a8_ref = fp8_linear_a8_ref(x, fw.qweight, fw.scale, 128, bias.float())
        assert_close(big, a8_ref, torch.bfloat16)


@gpu
@pytest.mark.parametrize("N,K", LLAMA8B)
@pytest.mark.parametrize("M", [1, 5, 32, 64])
def test_gpu_a8_configs(M, N, K):
    """FP8 x FP8 dots, the activations quantized per token and K step in the kernel: equal to
    the reference that quantizes them the same way, and near the weight-only result."""
    if not _fp8_gpu():
        pytest.skip("FP8 needs compute capability >= 8.9")
    gen = torch.Generator().manual_seed(M + N)
    q, scale = make_weight(N, K, None, gen, "cuda")
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16).cuda()
    bias = torch.randn(N, generator=gen).to(torch.bfloat16).cuda()
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    exact = fp8_linear_ref(x.float(), q, scale)
    for swap, split, bk in ((0, 1, 128), (1, 1, 128), (1, 4, 128), (1, 2, 256)):
        cfg = {"block_m": bm, "block_n": 64 if swap else 32, "block_k": bk, "split": split,
               "num_warps": 4, "num_stages": 4, "swap": swap, "a8": 1}  # fmt: skip
        ref = fp8_linear_a8_ref(x, q, scale, bk, bias.float())
        out = fp8_linear_w8a16(x, q, scale, None, bias, cfg)
        assert_close(out, ref, torch.bfloat16)
        # activation rounding (3 mantissa bits) against unquantized activations: small
        rel = ((out.float() - bias.float() - exact).norm() / exact.norm()).item()
        assert rel < 0.05, rel
    with pytest.raises(ValueError, match="per-channel"):
        fp8_linear_w8a16(x, q, torch.ones(N // 128, K // 128, device="cuda"), (128, 128), None,
                         {**cfg, "split": 1})  # fmt: skip


@gpu
def test_gpu_fp16_activations_stay_weight_only():
    """Row-wise _scaled_mm writes bf16 only: fp16 activations take the weight-only kernel at
    any token count."""
    if not _fp8_gpu():
        pytest.skip("FP8 needs compute capability >= 8.9")
    gen = torch.Generator().manual_seed(3)
    q, scale = make_weight(512, 256, None, gen, "cuda")
    x = torch.randn(300, 256, generator=gen).to(torch.float16).cuda()
    out = K.fp8_linear(x, q, scale, None, None, w8a8_min_tokens=1)
    assert out.dtype == torch.float16
    assert_close(out, fp8_linear_ref(x.float(), q, scale), torch.float16)


@gpu
def test_gpu_graph_replay_equals_eager():
    if not _fp8_gpu():
        pytest.skip("FP8 needs compute capability >= 8.9")
    gen = torch.Generator().manual_seed(5)
    q, scale = make_weight(4096, 14336, None, gen, "cuda")
    x = torch.randn(8, 14336, generator=gen).to(torch.bfloat16).cuda()
    eager = fp8_linear_w8a16(x, q, scale)  # compiles; split-K for these 64 N tiles
    assert default_w8a16_config(8, 4096, 14336, None, True, 132)["split"] > 1
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fp8_linear_w8a16(x, q, scale)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fp8_linear_w8a16(x, q, scale)
    x.copy_(torch.randn(8, 14336, generator=gen).to(torch.bfloat16).cuda())
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_linear_w8a16(x, q, scale))
    assert not torch.equal(out, eager)


@gpu
@pytest.mark.parametrize("a8", [0, 1])
def test_gpu_last_split_reduces_in_graph_replays(a8):
    """The K split whose last program sums the partials: every replay of a graph of many such
    GEMMs (their counters handed out in turn) equals the split the caller reduces, and every
    counter is back at zero afterwards."""
    if not _fp8_gpu():
        pytest.skip("FP8 needs compute capability >= 8.9")
    gen = torch.Generator().manual_seed(6)
    ws = [make_weight(4096, 4096, None, gen, "cuda") for _ in range(6)]
    x = torch.randn(32, 4096, generator=gen).to(torch.bfloat16).cuda()
    base = {"block_m": 32, "block_n": 64, "block_k": 128, "split": 4, "num_warps": 4,
            "num_stages": 4, "swap": 1, "a8": a8}  # fmt: skip

    def run(fixup: int) -> list[torch.Tensor]:
        return [fp8_linear_w8a16(x, q, s, None, None, {**base, "fixup": fixup}) for q, s in ws]

    run(1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(1)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = run(1)
    for i in range(50):
        x.copy_(torch.randn(32, 4096, generator=gen).to(torch.bfloat16).cuda())
        g.replay()
        want = run(0)
        torch.cuda.synchronize()
        for o, w in zip(outs, want, strict=True):
            assert torch.allclose(o.float(), w.float(), rtol=1e-2, atol=1e-2), i
    assert int(_counts[x.device][0].abs().sum()) == 0


def test_split_counters_return_to_zero():
    gen = torch.Generator().manual_seed(7)
    q, scale = make_weight(48, 96, None, gen)
    x = torch.randn(5, 96, generator=gen).to(DEVICE)
    cfg = {"block_m": 16, "block_n": 16, "block_k": 16, "split": 3, "num_warps": 4, "fixup": 1}
    ref = fp8_linear_ref(x, q, scale)
    for _ in range(3):
        assert_close(fp8_linear_w8a16(x, q, scale, None, None, cfg), ref, torch.float32)
    assert int(_counts[x.device][0].abs().sum()) == 0


def test_dequantize_block_layout():
    q = torch.full((5, 6), 2.0).to(FP8)
    scale = torch.tensor([[1.0, 10.0], [100.0, 1000.0]])
    w = dequantize(q, scale, (4, 4), torch.float32)
    assert w[0, 0] == 2 and w[0, 5] == 20 and w[4, 0] == 200 and w[4, 5] == 2000
