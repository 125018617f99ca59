"""RMSNorm (+residual), SiLU-and-mul and the fused rotary + KV-cache write vs the torch
references (and those references vs HF's rotary and a per-token cache write)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, assert_close, gpu

from loraplex.engine.kernels.kv_cache_write import FP8_KV, kv_cache_write_ref
from loraplex.engine.kernels.rms_norm import rms_norm, rms_norm_ref
from loraplex.engine.kernels.rope_cache import rope_cache, rope_cache_ref
from loraplex.engine.kernels.rotary import rotary_cos_sin_cache, rotary_ref
from loraplex.engine.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

DTYPES = [torch.float32, torch.float16]


def check_rms(T, H, dtype, residual):
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(H, generator=gen)).to(dtype)
    r = torch.randn(T, H, generator=gen).to(dtype) if residual else None
    ref = rms_norm_ref(x.float(), w.float(), 1e-5, None if r is None else r.float())
    out = rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-5, None if r is None else r.to(DEVICE))
    if residual:
        assert_close(out[0], ref[0], dtype)
        assert_close(out[1], ref[1], dtype)
    else:
        assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("T,H", [(1, 2049), (3, 64), (133, 96)])
def test_rms_norm(T, H, dtype, residual):
    check_rms(T, H, dtype, residual)


def test_rotary_ref_matches_hf_neox():
    # rotate_half formulation (HF Llama): x * cos + rotate_half(x) * sin
    d = 8
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cache = rotary_cos_sin_cache(inv, 16)
    q, k = torch.randn(3, 2, d), torch.randn(3, 1, d)
    pos = torch.tensor([0, 5, 15])
    freqs = torch.outer(pos.float(), inv)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]

    def rot_half(x):
        return torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)

    eq, ek = q * cos + rot_half(q) * sin, k * cos + rot_half(k) * sin
    qr, kr = rotary_ref(q.clone(), k.clone(), pos, cache)
    torch.testing.assert_close(qr, eq)
    torch.testing.assert_close(kr, ek)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,i", [(1, 2049), (7, 64), (133, 33)])
def test_silu_and_mul(T, i, dtype):
    x = torch.randn(T, 2 * i, generator=torch.Generator().manual_seed(T)).to(dtype)
    assert_close(silu_and_mul(x.to(DEVICE)), silu_and_mul_ref(x.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,i", [(1, 2049), (7, 64), (133, 33)])
def test_silu_and_mul_with_delta(T, i, dtype):
    # the gate/up LoRA delta added inside the activation == activation of the sum
    gen = torch.Generator().manual_seed(T + 1)
    x = torch.randn(T, 2 * i, generator=gen).to(dtype)
    d = (torch.randn(T, 2 * i, generator=gen) * 0.5).to(dtype)
    want = silu_and_mul_ref(x.float() + d.float())
    assert_close(silu_and_mul(x.to(DEVICE), d.to(DEVICE)), want, dtype)
    torch.testing.assert_close(silu_and_mul_ref(x.float(), d.float()), want)
    with pytest.raises(ValueError, match="delta"):
        silu_and_mul(x.to(DEVICE), d[:, :-2].to(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,i", [(1, 2049), (133, 33)])
def test_gelu_tanh_and_mul(T, i, dtype):
    """Gemma's GeGLU: gelu (tanh approximation, as transformers' gelu_pytorch_tanh) of the
    gate (+ the LoRA delta) times up; large gates too (the kernel's exp form saturates)."""
    gen = torch.Generator().manual_seed(T + 2)
    x = (torch.randn(T, 2 * i, generator=gen) * 4).to(dtype)
    d = (torch.randn(T, 2 * i, generator=gen) * 0.5).to(dtype)
    xf = x.float() + d.float()
    want = torch.nn.functional.gelu(xf[:, :i], approximate="tanh") * xf[:, i:]
    torch.testing.assert_close(silu_and_mul_ref(x.float(), d.float(), gelu=True), want)
    assert_close(silu_and_mul(x.to(DEVICE), d.to(DEVICE), gelu=True), want, dtype)
    assert (want - silu_and_mul_ref(xf)).abs().max() > 0.1  # not SiLU


@pytest.mark.parametrize("T,hkv,d,bs", [(1, 1, 64, 16), (7, 2, 32, 4), (133, 3, 24, 8)])
def test_kv_cache_write_ref(T, hkv, d, bs):
    # the reference (rope_cache_ref's cache write) against one token at a time
    gen = torch.Generator().manual_seed(T)
    nb = (T + bs - 1) // bs + 2
    k, v = torch.randn(T, hkv, d, generator=gen), torch.randn(T, hkv, d, generator=gen)
    kc, vc = torch.randn(nb, bs, hkv, d, generator=gen), torch.randn(nb, bs, hkv, d, generator=gen)
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    slots[::3] = -1  # padding tokens are skipped
    kr, vr = kc.clone(), vc.clone()
    kv_cache_write_ref(k, v, kr, vr, slots)
    for t in range(T):
        s_ = int(slots[t])
        if s_ >= 0:
            kc[s_ // bs, s_ % bs], vc[s_ // bs, s_ % bs] = k[t], v[t]
    assert torch.equal(kr, kc) and torch.equal(vr, vc)


def check_rope_cache(T, hq, hkv, d, bs, dtype, with_delta, rot=None):
    """``rot``: partial rotary (the first ``rot`` dims of each head turn)."""
    gen = torch.Generator().manual_seed(T + hq)
    r = rot or d
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    cos_sin = rotary_cos_sin_cache(inv, 4096, 1.0 if rot is None else 1.19)
    width = (hq + 2 * hkv) * d
    qkv = torch.randn(T, width, generator=gen).to(dtype)
    delta = (torch.randn(T, width, generator=gen) * 0.3).to(dtype) if with_delta else None
    nb = (T + bs - 1) // bs + 2
    kc = torch.randn(nb, bs, hkv, d, generator=gen).to(dtype)
    vc = torch.randn(nb, bs, hkv, d, generator=gen).to(dtype)
    pos = torch.randint(4096, (T,), generator=gen)
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    slots[1::3] = -1  # padding tokens: q still rotated, nothing stored
    kr, vr = kc.float().clone(), vc.float().clone()
    dr = delta.float() if with_delta else None
    qr = rope_cache_ref(qkv.float().clone(), pos, cos_sin, kr, vr, slots, hq, hkv, dr)
    kd, vd = kc.to(DEVICE), vc.to(DEVICE)
    qkv_d = qkv.clone().to(DEVICE)  # the kernel writes q in place
    dd = delta.to(DEVICE) if with_delta else None
    q = rope_cache(qkv_d, pos.to(DEVICE), cos_sin.to(DEVICE), kd, vd, slots.to(DEVICE), hq, hkv, dd)
    tol = 2e-5 if dtype == torch.float32 else None
    assert q.shape == (T, hq, d) and q.data_ptr() == qkv_d.data_ptr()
    assert_close(q, qr, dtype, tol=tol)
    assert_close(kd, kr, dtype, tol=tol)
    assert_close(vd, vr, dtype, tol=tol)
    # the same as the separate ops: add, rotary, cache write
    if not with_delta:
        qs = qkv.float().clone()[:, : hq * d].reshape(T, hq, d)
        ks = qkv.float().clone()[:, hq * d : (hq + hkv) * d].reshape(T, hkv, d)
        rotary_ref(qs, ks, pos, cos_sin)
        torch.testing.assert_close(qr, qs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("T,hq,hkv,d,bs", [(1, 4, 1, 64, 16), (7, 6, 2, 32, 4), (133, 3, 3, 16, 8)])
def test_rope_cache(T, hq, hkv, d, bs, dtype, with_delta):
    check_rope_cache(T, hq, hkv, d, bs, dtype, with_delta)


@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("T,hq,hkv,d,rot", [(5, 6, 2, 32, 24), (3, 3, 1, 16, 4)])
def test_rope_cache_partial_rotary(T, hq, hkv, d, rot, with_delta):
    """Phi-4-mini: only the leading dims turn (cos/sin scaled: longrope); the rest of q and
    k, and all of v, pass (plus the delta)."""
    check_rope_cache(T, hq, hkv, d, 4, torch.float32, with_delta, rot)
    # the reference: the passing dims of q are the input's (no delta) exactly
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    qkv = torch.randn(T, (hq + 2 * hkv) * d)
    kc = torch.zeros(4, 4, hkv, d)
    slots = torch.arange(T)
    q = rope_cache_ref(
        qkv.clone(), slots, rotary_cos_sin_cache(inv, 64), kc, kc.clone(), slots, hq, hkv
    )
    torch.testing.assert_close(q[..., rot:], qkv[:, : hq * d].reshape(T, hq, d)[..., rot:])
    assert not torch.allclose(q[1:, :, :rot], qkv[1:, : hq * d].reshape(T - 1, hq, d)[..., :rot])


def test_rope_cache_fp8_cache():
    """An e4m3 cache: K and V stored at their slots, cast with a scale of 1 and saturated at
    +-448, by the kernel as by the reference. Position 0 leaves k unturned (cos 1, sin 0) and
    the inputs are e4m3 values or far past its range, so that both casts are exact (Triton's
    interpreter rounds some float32 -> e4m3 casts wrongly; the GPU test checks rounding)."""
    T, hq, hkv, d, bs = 6, 4, 2, 16, 4
    gen = torch.Generator().manual_seed(3)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos_sin = rotary_cos_sin_cache(inv, 64)
    width = (hq + 2 * hkv) * d
    qkv = (torch.randn(T, width, generator=gen) * 40).to(FP8_KV).float()
    qkv[0, hq * d] = 1000.0  # k past the range
    qkv[1, (hq + hkv) * d + 3] = -3000.0  # v past the range
    nb = 4
    kc = torch.zeros(nb, bs, hkv, d, dtype=FP8_KV)
    vc = torch.zeros(nb, bs, hkv, d, dtype=FP8_KV)
    pos = torch.zeros(T, dtype=torch.long)
    slots = torch.tensor([5, 0, -1, 9, 15, 2])
    kr, vr = kc.clone(), vc.clone()
    rope_cache_ref(qkv.clone(), pos, cos_sin, kr, vr, slots, hq, hkv)
    k_in = qkv[:, hq * d : (hq + hkv) * d].reshape(T, hkv, d)
    v_in = qkv[:, (hq + hkv) * d :].reshape(T, hkv, d)
    for t, s_ in enumerate(slots.tolist()):
        if s_ >= 0:
            assert torch.equal(kr.view(-1, hkv, d)[s_].float(), k_in[t].clamp(-448, 448))
            assert torch.equal(vr.view(-1, hkv, d)[s_].float(), v_in[t].clamp(-448, 448))
    assert kr.view(-1, hkv, d)[5, 0, 0].float() == 448 and vr.view(-1, hkv, d)[0, 0, 3] == -448
    kd, vd = kc.to(DEVICE), vc.to(DEVICE)
    args = (pos.to(DEVICE), cos_sin.to(DEVICE), kd, vd, slots.to(DEVICE), hq, hkv)
    rope_cache(qkv.clone().to(DEVICE), *args)
    assert kd.dtype == FP8_KV
    assert torch.equal(kd.cpu().float(), kr.float()) and torch.equal(vd.cpu().float(), vr.float())


def test_rope_cache_rejects_bad_shapes():
    kc = torch.zeros(2, 4, 1, 8, device=DEVICE)
    cs = torch.zeros(16, 8, device=DEVICE)
    pos = torch.zeros(3, dtype=torch.long, device=DEVICE)
    qkv = torch.zeros(3, 24, device=DEVICE)
    with pytest.raises(ValueError, match="delta"):
        rope_cache(qkv, pos, cs, kc, kc.clone(), pos, 1, 1, torch.zeros(3, 16, device=DEVICE))
    with pytest.raises(ValueError, match="caches"):
        rope_cache(qkv, pos, cs, kc[..., :4], kc[..., :4].clone(), pos, 1, 1)
    with pytest.raises(ValueError, match="qkv"):
        rope_cache(torch.zeros(3, 25, device=DEVICE), pos, cs, kc, kc.clone(), pos, 1, 1)


@gpu
@pytest.mark.parametrize("T", [1, 133, 2048])
def test_elementwise_llama_bf16(T):
    bf = torch.bfloat16
    check_rms(T, 4096, bf, residual=False)
    check_rms(T, 4096, bf, residual=True)
    x = torch.randn(T, 2 * 14336).to(bf)
    assert_close(silu_and_mul(x.cuda()), silu_and_mul_ref(x.float()), bf)
    d = torch.randn(T, 2 * 14336).to(bf)
    assert_close(silu_and_mul(x.cuda(), d.cuda()), silu_and_mul_ref(x.float() + d.float()), bf)
    check_rope_cache(T, 32, 8, 128, 16, bf, with_delta=False)
    check_rope_cache(T, 32, 8, 128, 16, bf, with_delta=True)
