"""The per-GPU-model launch-config table: kept in a JSON file named by the device and Triton
version, read back only for the same key, and consulted by the FP8 projections by shape."""

from __future__ import annotations

import json

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
