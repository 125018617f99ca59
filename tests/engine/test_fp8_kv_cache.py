"""The KV cache in FP8 (``kv_cache_dtype="fp8"``: e4m3, scale 1) through the real runner and
engine on the CPU (the torch reference ops; the Triton kernels' FP8 loads and stores are
tested in tests/kernels and on the GPU below).

What it must keep: the same memory holds more tokens (one byte a value); every K and V the
model writes comes back as its e4m3 rounding, so logits stay near the model-dtype cache's
(a wrong block, slot or layer would be far off: the tables interleave sequences and a
sliding-window family's spare block holds NaN); prefix hits, the sliding-window layout and
adapters work as with any cache; a bad setting is refused in one line.
"""

from __future__ import annotations

import pytest
import torch
from engine_drive import drive
from model_builders import (
    VOCAB,
    AdapterSpec,
    Seq,
    build_adapter,
    build_hf_model,
    prompts_for,
    rel_err,
    runner_logits,
)

from loraplex.engine.api import AdapterRef, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.kernels.kv_cache_write import FP8_KV
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model_runner import ModelRunner


def cpu_runner(model, kv: str, **kw) -> ModelRunner:
    opts = dict(
        device="cpu", dtype=torch.float32, block_size=4, max_num_seqs=8, max_model_len=64,
        max_loras=2, max_lora_rank=16, num_blocks=16 * 8, kv_cache_dtype=kv,
    )  # fmt: skip
    return ModelRunner(model, **{**opts, **kw})


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_runner_fp8_cache_near_the_model_dtype_cache(kind, tmp_path):
    """Two-chunk prefills and decode steps over interleaved block tables, with an adapter:
    the FP8 cache's logits within e4m3's rounding of the float32 cache's, every position.
    Gemma 3: its local layers' own tables (the sliding-window layout)."""
    base = build_hf_model(tmp_path / kind, kind, seed=3)
    lora = build_adapter(base, tmp_path / "lora", AdapterSpec(8, ("q_proj", "v_proj"), seed=1))
    prompts = prompts_for(3, VOCAB, seed=4)
    seqs = [
        Seq(p, s, prompts[(i + 1) % 3][:4])
        for i, (p, s) in enumerate(zip(prompts, [-1, 0, -1], strict=True))
    ]
    got = {}
    for kv in ("auto", "fp8"):
        runner = cpu_runner(str(base), kv)
        runner.write_slot(0, runner.read_adapter(lora))
        assert runner.kv_caches[0][0].dtype == (FP8_KV if kv == "fp8" else torch.float32)
        got[kv] = runner_logits(runner, seqs, 4)
    for i, (f, a) in enumerate(zip(got["fp8"], got["auto"], strict=True)):
        assert torch.isfinite(f).all()
        # e4m3 keeps 3 mantissa bits: on these random models (hot activations, logits in the
        # tens) the logits move by 0.06-0.15 of their largest; the next position's logits,
        # what a cache read at the wrong slot gives, are 0.7-1.4 away
        err, off = rel_err(f, a), rel_err(f[1:], a[:-1])
        assert 1e-4 < err < 0.3 < off, (i, err, off)


def test_fp8_cache_holds_more_blocks():
    """The same bytes hold a block per byte a value: 4x a float32 cache's blocks (2x bf16's)."""
    n = {}
    for kv in ("auto", "fp8"):
        r = cpu_runner("dummy:tiny", kv, num_blocks=None, kv_cache_bytes=8 << 20)
        n[kv] = r.num_blocks
        assert r.block_bytes() * r.num_blocks <= 8 << 20
    assert n["fp8"] == 4 * n["auto"]


def test_engine_with_fp8_cache_prefix_hit_and_adapter(tmp_path):
    """The whole engine with an FP8 cache: requests with and without an adapter finish with
    their tokens, a repeated prompt hits the prefix cache and decodes the same tokens as
    the first time (its K/V read back from the FP8 blocks the first one wrote)."""
    base = build_hf_model(tmp_path / "llama", "llama", seed=2)
    lora = build_adapter(base, tmp_path / "lora", AdapterSpec(8, ("q_proj", "o_proj"), seed=3))
    cfg = EngineConfig(
        block_size=4, max_loras=2, max_lora_rank=16, device="cpu", dtype="float32",
        num_gpu_blocks=128, kv_cache_dtype="fp8",
    )  # fmt: skip
    engine = LLMEngine.from_model(str(base), cfg)
    assert engine.runner.kv_caches[0][0].dtype == FP8_KV
    prompts = prompts_for(2, VOCAB, seed=9)
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=5)
    ref = AdapterRef("kv8@v1", str(lora))
    got: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    for batch in ([("a", 0, None), ("b", 1, ref)], [("c", 0, None), ("d", 1, ref)]):
        reqs = [Request(rid, prompts[p], greedy, a) for rid, p, a in batch]
        got.update(drive(engine, reqs, cached))
    engine.shutdown()
    assert all(len(t) == 5 for t in got.values()), got
    assert got["c"] == got["a"] and got["d"] == got["b"]
    # every whole block of the prompt but the one holding its last token (computed again)
    assert cached["c"] == (len(prompts[0]) - 1) // 4 * 4 > 0
    assert cached["d"] == (len(prompts[1]) - 1) // 4 * 4 > 0


def test_kv_cache_dtype_is_validated():
    with pytest.raises(Exception, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8").validate()
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        cpu_runner("dummy:tiny", "e5m2")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with FP8 (compute capability >= 8.9)",
)
def test_gpu_fp8_cache_triton_matches_reference_and_graphs(tmp_path, monkeypatch):
    """bf16 on the GPU: the Triton path (cache write in rope_cache, both attention kernels,
    decode graphs) with an FP8 cache against the torch reference path with the same FP8
    cache, and both near the bf16 cache."""
    base = build_hf_model(tmp_path / "llama", "llama", seed=3)
    prompts = prompts_for(3, VOCAB, seed=4)
    seqs = [Seq(p, -1, prompts[(i + 1) % 3][:6]) for i, p in enumerate(prompts)]
    kw = dict(device="cuda", dtype=torch.bfloat16, block_size=16, max_num_seqs=8,
              max_model_len=64, max_loras=2, max_lora_rank=16, num_blocks=64)  # fmt: skip
    got = {}
    for name, kv, eager, mode in (
        ("graphs", "fp8", False, ""), ("eager", "fp8", True, ""),
        ("ref", "fp8", True, "ref"), ("bf16", "auto", False, ""),
    ):  # fmt: skip
        monkeypatch.setenv("LORAPLEX_KERNELS", mode)
        runner = ModelRunner(str(base), kv_cache_dtype=kv, enforce_eager=eager, **kw)
        assert runner.kv_caches[0][0].dtype == (FP8_KV if kv == "fp8" else torch.bfloat16)
        got[name] = runner_logits(runner, seqs, 6)
        del runner
    for i in range(len(seqs)):
        g, e, r, b = (got[k][i] for k in ("graphs", "eager", "ref", "bf16"))
        assert rel_err(g, e) < 3e-2, i  # the same kernels (graph batches padded)
        # the reference's bf16 ops round K and V a little differently before the e4m3 cast,
        # which may then land a step (1/16) apart: further apart than bf16 caches (H100,
        # 12-06: 0.050 on one sequence); a wrong slot is the next position's, 0.7-1.4 away
        assert rel_err(e, r) < 0.15 < rel_err(e[1:], r[:-1]), i
        assert rel_err(g, b) < 0.3 < rel_err(g[1:], b[:-1]), i
