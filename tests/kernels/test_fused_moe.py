"""The grouped-GEMM-by-expert kernel and the MoE layer's expert LoRA (SGMV over (adapter,
expert) pairs) against the torch references, fp32 and fp16, small odd shapes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from kernel_testing import DEVICE, assert_close, gpu

from loraplex.engine.kernels import build_lora_meta
from loraplex.engine.kernels.fused_moe import moe_gemm, moe_gemm_ref
from loraplex.engine.lora.pool import LoraPool
from loraplex.engine.lora.weights import read_adapter
from loraplex.engine.model.config import ModelConfig
from loraplex.engine.model.moe import moe_mlp

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _ids(T: int, E: int, k: int, gen, mode: str) -> torch.Tensor:
    if mode == "one-expert":  # every token's first choice the same expert
        rest = [torch.randperm(E - 1, generator=gen)[: k - 1] + 1 for _ in range(T)]
        return torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), r]) for r in rest]).int()
    return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).int()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "T, E, k, N, K, mode",
    [(1, 8, 2, 48, 40, "random"), (3, 4, 3, 33, 64, "random"), (7, 16, 4, 64, 32, "random"),
     (40, 8, 2, 40, 48, "one-expert")],
)  # fmt: skip
def test_moe_gemm_matches_reference(dtype, T, E, k, N, K, mode):
    gen = torch.Generator().manual_seed(T * 100 + E)
    x = torch.randn(T, K, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(E, N, K, generator=gen) / K**0.5).to(DEVICE, dtype)
    ids = _ids(T, E, k, gen, mode).to(DEVICE)
    assert_close(moe_gemm(x, w, ids, False), moe_gemm_ref(x, w, ids, False), dtype)
    xp = torch.randn(T * k, K, generator=gen).to(DEVICE, dtype)
    assert_close(moe_gemm(xp, w, ids, True), moe_gemm_ref(xp, w, ids, True), dtype)


CFG = ModelConfig(
    vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=2,
    num_kv_heads=1, head_dim=16, qk_norm=True, num_experts=6, num_experts_per_tok=2,
    moe_intermediate_size=24, norm_topk_prob=True, architecture="Qwen3MoeForCausalLM",
)  # fmt: skip


def _adapter(path, rank: int, targets: tuple[str, ...], seed: int):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    H, MI = CFG.hidden_size, CFG.moe_intermediate_size
    dims = {"gate_proj": (H, MI), "up_proj": (H, MI), "down_proj": (MI, H)}
    t = {}
    for layer in range(CFG.num_layers):
        for e in range(CFG.num_experts):
            for m in targets:
                i, o = dims[m]
                pre = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{m}"
                t[f"{pre}.lora_A.weight"] = torch.randn(rank, i, generator=gen) / i**0.5
                t[f"{pre}.lora_B.weight"] = torch.randn(o, rank, generator=gen) / rank**0.5
    path.mkdir()
    save_file(t, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(targets)}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("grouped", [False, True], ids=["per-token", "grouped"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_lora_triton_matches_reference(dtype, grouped, tmp_path, monkeypatch):
    """Three adapters (ranks 8, 16 and 5; gate/up/down, down only) in 4 slots, tokens of
    every slot and of none, through the MoE layer: the Triton path (grouped GEMMs, SGMV over
    virtual slots slot * E + expert: per token in decode steps, else over the pairs grouped
    on the device) equals the references'."""
    specs = [(8, ("gate_proj", "up_proj", "down_proj")), (16, ("down_proj",)),
             (5, ("gate_proj", "up_proj", "down_proj"))]  # fmt: skip
    pool = LoraPool(
        CFG, budget_bytes=1 << 22, max_rank=16, dtype=dtype, device=torch.device(DEVICE)
    )
    for slot, (i, (r, targets)) in zip([0, 3, 1], enumerate(specs), strict=True):
        w = read_adapter(_adapter(tmp_path / f"a{i}", r, targets, i), CFG, max_rank=16, dtype=dtype)
        pool.write(slot, w)
    gen = torch.Generator().manual_seed(7)
    H, E, MI = CFG.hidden_size, CFG.num_experts, CFG.moe_intermediate_size
    T = 13
    h = torch.randn(T, H, generator=gen).to(DEVICE, dtype)
    router = torch.randn(E, H, generator=gen).to(DEVICE, dtype)
    gate_up = (torch.randn(E, 2 * MI, H, generator=gen) / H**0.5).to(DEVICE, dtype)
    down = (torch.randn(E, H, MI, generator=gen) / MI**0.5).to(DEVICE, dtype)
    slots = torch.tensor([0, 3, -1, 1, 0, 0, 3, -1, 1, 1, 0, 3, 2], dtype=torch.int32)
    meta = build_lora_meta(slots).to(DEVICE)
    offsets = {"experts_gate_up": [0, MI, 2 * MI], "experts_down": [0, H]}
    outs = {}
    side = torch.cuda.Stream() if DEVICE == "cuda" else None
    for mode in ("ref", "triton"):
        monkeypatch.setenv("LORAPLEX_KERNELS", mode)
        layer = pool.layers[1]  # the second layer: its rows sit past the first's
        groups = {g: layer[g] for g in offsets}
        outs[mode] = moe_mlp(h, router, gate_up, down, CFG, groups, offsets, meta, grouped=grouped)
        # the LoRA as deltas beside the grouped GEMMs (store mode: rows of no adapter zero,
        # though the buffers start uninitialized), on a stream of its own on CUDA
        outs[f"{mode} beside"] = moe_mlp(
            h, router, gate_up, down, CFG, groups, offsets, meta, grouped=grouped, beside=True,
            side_stream=side,
        )  # fmt: skip
        # grouped: the gate/up delta into the GEMM output, then the activation (the fused
        # kernel's control)
        outs[f"{mode} unfused"] = moe_mlp(
            h, router, gate_up, down, CFG, groups, offsets, meta, grouped=grouped, fuse_act=False
        )
        base = moe_mlp(h, router, gate_up, down, CFG, {}, offsets, None)
    assert_close(outs["triton"], outs["ref"], dtype)
    assert_close(outs["triton unfused"], outs["ref"], dtype)
    assert_close(outs["ref unfused"], outs["ref"], dtype)
    assert_close(outs["triton beside"], outs["triton"], dtype)
    assert_close(outs["ref beside"], outs["ref"], dtype)
    # rows of padding as a decode graph's bucket adds them (no adapter; they route to experts
    # too and share the sorted blocks and the LoRA kernels' grids) change no real row
    pad = torch.randn(6, H, generator=gen).to(DEVICE, dtype)
    meta_pad = build_lora_meta(torch.cat([slots, torch.full((6,), -1, dtype=torch.int32)]))
    hp = torch.cat([h, pad])
    padded = moe_mlp(
        hp, router, gate_up, down, CFG, groups, offsets, meta_pad.to(DEVICE), grouped=grouped
    )
    assert_close(padded[:T], outs["triton"], dtype)
    # the adapters change every token that has one, and only those
    changed = (outs["ref"] - base).abs().amax(1) > 1e-3
    assert changed.tolist() == [s != -1 and s != 2 for s in slots.tolist()]


def test_expert_grouped_when_pairs_fill_segments():
    # host ints only: at least 2 pairs per (adapter, expert) on average and GROUPED_MIN_PAIRS
    # in all (12,288: 1,536 tokens at top-8), never in decode
    from loraplex.engine.model.moe import GROUPED_MIN_PAIRS, expert_grouped

    cfg = dataclasses.replace(CFG, num_experts=128, num_experts_per_tok=8)
    n = GROUPED_MIN_PAIRS // 8  # tokens at top-8

    def grouped(slots, decode=False):
        return expert_grouped(build_lora_meta(torch.tensor(slots, dtype=torch.int32)), cfg, decode)

    spread = [i % 32 for i in range(2048)]  # 32 adapters
    assert grouped(spread)  # 16,384 pairs >= 8,192 and >= GROUPED_MIN_PAIRS
    assert grouped(spread[:n])
    assert not grouped(spread[: n - 1])  # 2 pairs per (adapter, expert), but too few in all
    assert not grouped(spread[:1024])  # the H100's per-token layer was 8 % faster here
    assert not grouped(spread, decode=True)
    assert not grouped([i % 96 for i in range(2048)])  # 96 adapters: 1.3 per (adapter, expert)
    assert grouped([i % 64 for i in range(2048)])  # 64: 2
    assert not grouped([i % 8 for i in range(512)])  # 4 per (adapter, expert), 4,096 in all
    assert grouped([0] * n + [-1] * 500)  # tokens with no adapter count not
    assert not grouped([0] * (n - 1) + [-1] * 600)


@gpu
def test_moe_gemm_cuda_graph_replay_equals_eager():
    """Sorting by expert and both GEMMs captured once, replayed with other routings."""
    from loraplex.engine.kernels.fused_moe import moe_block_m, moe_blocks

    gen = torch.Generator().manual_seed(3)
    T, E, k, N, K = 64, 128, 8, 256, 512
    x = torch.randn(T, K, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(E, N, K, generator=gen) / K**0.5).to("cuda", torch.bfloat16)
    ids = _ids(T, E, k, gen, "random").cuda()

    def run():
        blocks = moe_blocks(ids, E, moe_block_m(T * k, E))
        return moe_gemm(x, w, ids, False, blocks)

    run()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for mode in ("random", "one-expert", "random"):
        ids.copy_(_ids(T, E, k, gen, mode).cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, moe_gemm_ref(x, w, ids, False), torch.bfloat16)
