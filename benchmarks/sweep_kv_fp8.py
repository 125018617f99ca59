"""Paged decode attention over a bf16 and an FP8 (e4m3) KV cache, Llama-3-8B's layer shape
(32 query heads, 8 KV heads, head_dim 128, blocks of 16), per launch config: the kernel's
device time (triton ``do_bench``, L2 flushed) against the bytes it must read. One command::

    PYTHONPATH=. python3 benchmarks/sweep_kv_fp8.py
"""

from __future__ import annotations

import itertools

import torch
from triton.testing import do_bench

from loraplex.engine.kernels.kv_cache_write import FP8_KV
from loraplex.engine.kernels.paged_decode_attention import paged_decode_attention


def main() -> None:
    dev = torch.device("cuda")
    hq, hkv, d, bs = 32, 8, 128, 16
    for batch, ctx in ((256, 320), (32, 512), (64, 2048)):
        per = -(-ctx // bs)
        nb = batch * per
        kc = torch.randn(nb, bs, hkv, d, device=dev, dtype=torch.bfloat16)
        vc = torch.randn(nb, bs, hkv, d, device=dev, dtype=torch.bfloat16)
        bt = torch.randperm(nb, device=dev, dtype=torch.int32).view(batch, per)
        cl = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
        q = torch.randn(batch, hq, d, device=dev, dtype=torch.bfloat16)
        ref = None
        for name, (k, v) in (("bf16", (kc, vc)), ("fp8", (kc.to(FP8_KV), vc.to(FP8_KV)))):
            nbytes = 2 * batch * ctx * hkv * d * k.element_size()
            res = []
            for bn, st, w in itertools.product((64, 128), (2, 3, 4), (4, 8)):
                cfg = {"block_n": bn, "num_stages": st, "num_warps": w}
                try:
                    out = paged_decode_attention(q, k, v, bt, cl, d**-0.5, config=cfg)
                    ms = do_bench(
                        lambda k=k, v=v, cfg=cfg, q=q, bt=bt, cl=cl: paged_decode_attention(
                            q, k, v, bt, cl, d**-0.5, config=cfg
                        ),
                        warmup=10,
                        rep=40,
                    )
                except Exception as exc:  # shared memory past the SM's, etc.
                    print(f"  {name} {cfg}: {type(exc).__name__}")
                    continue
                if ref is None:
                    ref = out.float()
                err = float((out.float() - ref).abs().max())
                res.append((ms, cfg, err))
            res.sort(key=lambda r: r[0])
            dflt = next(r for r in res if r[1] == {"block_n": 64, "num_stages": 3, "num_warps": 4})
            print(
                f"batch {batch} ctx {ctx} {name}: {nbytes / 1e6:.0f} MB, default "
                f"{dflt[0] * 1e3:.1f} us ({nbytes / dflt[0] / 1e6:.0f} GB/s)"
            )
            for ms, cfg, err in res[:4]:
                print(f"   {ms * 1e3:7.1f} us  {nbytes / ms / 1e6:5.0f} GB/s  {cfg}  err {err:.3f}")


if __name__ == "__main__":
    main()
