"""The per-GPU-model launch-config table: kept in a JSON file named by the device and Triton
version, read back only for the same key, and consulted by the FP8 projections by shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from kernel_testing import DEVICE

from loraplex.engine.kernels.fp8_linear import FP8
from loraplex.engine.kernels.tuning import LaunchConfigs, device_key
from loraplex.engine.model.fp8 import Fp8Weight
from loraplex.engine.model.llama import Fp8Options, LlamaModel, fp8_shape_key
from loraplex.engine.model.loader import load_model


def test_table_round_trip_per_device(tmp_path):
    cfgs = LaunchConfigs.for_device(torch.device("cpu"), tmp_path)
    assert cfgs.path is not None and cfgs.path.parent == tmp_path
    assert cfgs.get("fp8_w8a16", "k") is None
    cfgs.put("fp8_w8a16", "k", {"block_n": 32, "split": 2})
    cfgs.save()
    again = LaunchConfigs.for_device(torch.device("cpu"), tmp_path)
    assert again.get("fp8_w8a16", "k") == {"block_n": 32, "split": 2}
    # a file written for another GPU model (or Triton version) is not used
    data = json.loads(cfgs.path.read_text())
    data["device"] = "NVIDIA H100 80GB HBM3 triton 3.6.0"
    cfgs.path.write_text(json.dumps(data))
    assert LaunchConfigs(device_key(torch.device("cpu")), cfgs.path).table == {}
    assert LaunchConfigs.for_device(torch.device("cpu"), None).path is None


def test_shape_keys_bucket_tokens():
    w = Fp8Weight(torch.zeros(64, 32).to(FP8), torch.ones(64))
    assert fp8_shape_key(w, 1) == fp8_shape_key(w, 16) == "64x32:c:m16"
    assert fp8_shape_key(w, 17) == "64x32:c:m32"
    wb = Fp8Weight(torch.zeros(64, 32).to(FP8), torch.ones(4, 2), (16, 16))
    assert fp8_shape_key(wb, 100) == "64x32:b16x16:m128"


def test_projection_uses_the_table_entry(monkeypatch):
    """The model's FP8 projection launches with the table's config for its shape (here one
    the kernel refuses for these block scales, so that its use shows)."""
    monkeypatch.setenv("LORAPLEX_KERNELS", "triton")
    loaded = load_model("dummy:tiny")
    cfgs = LaunchConfigs("test")
    model = LlamaModel(loaded.config, loaded.weights, 64, Fp8Options(128, cfgs))
    w = Fp8Weight(torch.ones(32, 64).to(FP8).to(DEVICE), torch.ones(2, 4, device=DEVICE), (16, 16))
    x = torch.randn(3, 64, device=DEVICE)
    assert model.linear(x, w).shape == (3, 32)  # defaults
    bad = {"block_m": 16, "block_n": 16, "block_k": 32, "split": 1, "num_warps": 4}
    cfgs.put("fp8_w8a16", fp8_shape_key(w, 3), bad)
    with pytest.raises(ValueError, match="block_k 32"):
        model.linear(x, w)


def _tiny_lora_runner(tmp_path, monkeypatch, max_lora_rank: int):
    """A tiny Llama on the Triton kernels (the interpreter on a CPU machine) with random
    rank-8 adapters (``random_lora_weights``) in slots 0 and 1."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    from model_builders import build_hf_model

    from loraplex.engine.lora.weights import random_lora_weights
    from loraplex.engine.model_runner import ModelRunner

    monkeypatch.setenv("LORAPLEX_KERNELS", "triton")
    base = build_hf_model(tmp_path / "base", "llama", seed=3)
    runner = ModelRunner(
        str(base), device=DEVICE, dtype=torch.float16, block_size=4, max_num_seqs=4,
        max_model_len=32, max_loras=4, max_lora_rank=max_lora_rank, num_blocks=40,
        enforce_eager=True,
    )  # fmt: skip
    for slot in (0, 1):
        w = random_lora_weights(runner.local_config, 8, torch.float16, seed=slot, std=0.1)
        runner.write_slot(slot, w)
    return runner


@pytest.mark.parametrize("pool_rank", [16, 64])
def test_decode_lora_launches_with_the_tuned_entry(tmp_path, monkeypatch, pool_rank):
    """A decode step's LoRA (beside the GEMMs) takes the table's ``lora_decode`` entry for
    its tokens, path and pool rank: every candidate the warm-up may pick gives the rules'
    logits, and an entry the kernel cannot launch (a 48-wide tile) fails the step, so the
    entry is what ran. Prefill steps keep the rules."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    from model_builders import Seq, rel_err, runner_logits

    from loraplex.engine.kernels.tuning import LORA_DECODE_CANDIDATES

    runner = _tiny_lora_runner(tmp_path, monkeypatch, pool_rank)
    model = runner.model
    # three sequences on slots 0, 1 and 0: two segments, 3 < 2 * 2 -> the per-token path
    seqs = [
        Seq([1, 2, 3, 4, 5], 0, [6, 7]),
        Seq([9, 8, 7, 6], 1, [5, 4]),
        Seq([3, 3, 4, 2], 0, [2, 1]),
    ]
    ref = runner_logits(runner, seqs, 1)
    cfgs = LaunchConfigs("test")
    model.lora_configs = cfgs
    key = model.lora_tune_key(3, "token", pool_rank)  # a pool of rank 16 / 64 is that wide
    assert {g.width for layer in runner.lora.layers for g in layer.values()} == {pool_rank}
    cands = LORA_DECODE_CANDIDATES["token"][1:]
    if pool_rank == 16:  # the same overrides; two of them show the rank-16 rules give way
        cands = cands[:1] + cands[-1:]
    for cand in cands:
        cfgs.put("lora_decode", key, cand)
        got = runner_logits(runner, seqs, 1)
        for r, g in zip(ref, got, strict=True):
            assert rel_err(g, r) < 1e-2, cand
    cfgs.put("lora_decode", key, {"expand": {"block_n": 48}})
    with pytest.raises(Exception, match=r"power of 2|power-of-2|power of two"):
        runner_logits(runner, seqs, 1)
    # the same entry under another bucket's key is not read
    cfgs.table.clear()
    cfgs.put("lora_decode", model.lora_tune_key(4, "token", pool_rank), {"expand": {"block_n": 48}})
    for r, g in zip(ref, runner_logits(runner, seqs, 1), strict=True):
        assert rel_err(g, r) < 1e-2


def test_random_lora_weights_fill_a_slot_at_their_rank(tmp_path, monkeypatch):
    """The tuning adapters: every projection of the groups asked for at the rank asked for,
    in the pool's pages as a read adapter would be."""
    runner = _tiny_lora_runner(tmp_path, monkeypatch, 64)
    assert runner.lora.ranks_used({0, 1}) == {"qkv": 8, "o": 8, "gate_up": 8, "down": 8}
    from loraplex.engine.lora.weights import random_lora_weights

    w = random_lora_weights(runner.local_config, 16, torch.float16, groups=("qkv", "down"))
    assert set(w.groups) == {"qkv", "down"} and w.max_rank == 16
    assert w.groups["qkv"].a.shape == (runner.config.num_layers, 3, 16, runner.config.hidden_size)
    runner.write_slot(2, w)
    assert runner.lora.ranks_used({2}) == {"qkv": 16, "down": 16}


def test_a_candidate_must_beat_the_defaults_by_the_margin():
    """The sweep's choice: the fastest candidate that ran, unless the first (the kernels'
    own rules) is within the margin of it; failed candidates (no time) never win."""
    from loraplex.engine.kernels.tuning import pick

    rules, a, b = {}, {"shrink": {"k_per": 1024}}, {"expand": {"n_per": 512}}
    t = {json.dumps(c, sort_keys=True): ms for c, ms in ((rules, 10.0), (a, 9.95), (b, 9.8))}
    assert pick([rules, a, b], t, 0.01) == b  # 2 % faster
    assert pick([rules, a, b], t, 0.03) == rules  # within 3 %
    assert pick([rules, a], t, 0.01) == rules  # 0.5 % faster: noise
    assert pick([rules, a], t, 0.0) == a
    del t[json.dumps(b, sort_keys=True)]
    assert pick([rules, b], t, 0.0) == rules  # b failed
    assert pick([b], t, 0.0) is None
    # the defaults failed: the fastest of the rest
    assert pick([b, a], {json.dumps(a, sort_keys=True): 5.0}, 0.5) == a
