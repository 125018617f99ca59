"""Decode-step base ops against their bytes floor: where a batch-32 step loses to bandwidth.

One command (CUDA): ``PYTHONPATH=. python benchmarks/bench_decode_ops.py``. For Llama-3-8B
shapes in bf16 it times, with triton's ``do_bench`` (L2 flushed between runs):

- the four decode GEMMs (qkv, o, gate_up, down) at M = 1/32/64/128 tokens: ``F.linear`` on the
  engine's ``[N, K]`` weights (cuBLAS), ``x @ W.T`` stored ``[K, N]`` (the other cuBLAS
  layout), and a Triton skinny GEMM (an experiment here: tiles of all M rows and BLOCK_N
  weight rows streaming K, no split) over a few configurations;
- paged decode attention (batch 32, context 512, 32 q / 8 kv heads, head 128, blocks of 16)
  over split and tile configurations.

Each time is printed with its bytes floor (weights + activations, or the KV read) over the
copy bandwidth measured in the same run, and against the engine's current choice.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth

from loraplex.engine.kernels._triton import tl, triton
from loraplex.engine.kernels.paged_decode_attention import paged_decode_attention


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None])
        wt = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=mask_n[:, None])
        acc += tl.dot(xt, tl.trans(wt))
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def skinny(x, w, block_n, block_k, warps, stages):
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bm = max(16, triton.next_power_of_2(M))
    _skinny_kernel[(triton.cdiv(N, block_n),)](
        x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
SKINNY = [(bn, bk, w, st) for bn in (32, 64) for bk in (128, 256) for w, st in ((4, 4), (4, 6))]


def main() -> None:
    from triton.testing import do_bench

    dev = torch.device("cuda")
    bw = copy_bandwidth(dev, nbytes=1 << 30)
    print(f"copy bandwidth (read+write): {bw / 1e9:.0f} GB/s")
    bf = torch.bfloat16
    print("\n| op | M | floor us | F.linear us | x/floor | x@Wt us | best Triton us | cfg |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=bf) * 0.02
        wt = w.t().contiguous()
        for m in (1, 32, 64, 128):
            x = torch.randn(m, k, device=dev, dtype=bf)
            floor = (w.numel() + x.numel() + m * n) * 2 / bw * 1e6
            ref = F.linear(x, w)
            t_lin = do_bench(lambda x=x, w=w: F.linear(x, w)) * 1e3
            t_nn = do_bench(lambda x=x, wt=wt: x @ wt) * 1e3
            best = (float("inf"), None)
            for cfg in SKINNY:
                try:
                    y = skinny(x, w, *cfg)
                    err = (y.float() - ref.float()).abs().max().item()
                    if err > 0.05 * ref.float().abs().max().item():
                        print(f"  {name} M={m} {cfg}: wrong ({err:.3g})")
                        continue
                    t = do_bench(lambda x=x, w=w, cfg=cfg: skinny(x, w, *cfg)) * 1e3
                except Exception as e:
                    print(f"  {name} M={m} {cfg}: {type(e).__name__}")
                    continue
                best = min(best, (t, cfg), key=lambda r: r[0])
            print(
                f"| {name} | {m} | {floor:.1f} | {t_lin:.1f} | {t_lin / floor:.2f} | "
                f"{t_nn:.1f} | {best[0]:.1f} | {best[1]} |",
                flush=True,
            )

    # paged decode attention, batch 32, context 512
    B, hq, hkv, d, bs, ctx = 32, 32, 8, 128, 16, 512
    nb = B * ctx // bs + 1
    kc = torch.randn(nb, bs, hkv, d, device=dev, dtype=bf)
    vc = torch.randn_like(kc)
    q = torch.randn(B, hq, d, device=dev, dtype=bf)
    tables = torch.arange(1, nb, device=dev, dtype=torch.int32).reshape(B, ctx // bs)
    lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    floor = (B * ctx * hkv * d * 2 * 2 + 2 * q.numel() * 2) / bw * 1e6
    ref = paged_decode_attention(q, kc, vc, tables, lens, d**-0.5)
    base = do_bench(lambda: paged_decode_attention(q, kc, vc, tables, lens, d**-0.5)) * 1e3
    print(f"\npaged decode attention B={B} ctx={ctx}: floor {floor:.1f} us, engine {base:.1f} us")
    rows = []
    for want in (264, 528, 1056, 2112):
        for bn in (32, 64, 128):
            for warps in (4, 8):
                for st in (2, 3, 4):
                    cfg = {"want": want, "block_n": bn, "num_warps": warps, "num_stages": st}
                    try:
                        f = lambda cfg=cfg: paged_decode_attention(  # noqa: E731
                            q, kc, vc, tables, lens, d**-0.5, config=cfg
                        )
                        err = (f().float() - ref.float()).abs().max().item()
                        if err > 2e-2:
                            print(f"  {cfg}: wrong ({err:.3g})")
                            continue
                        rows.append((do_bench(f) * 1e3, cfg))
                    except Exception as e:
                        print(f"  {cfg}: {type(e).__name__}")
    for t, cfg in sorted(rows, key=lambda r: r[0])[:8]:
        print(f"  {t:6.1f} us  x/floor {t / floor:.2f}  vs engine {t / base:.2f}  {cfg}")


if __name__ == "__main__":
    main()
