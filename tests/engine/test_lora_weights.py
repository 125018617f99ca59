"""Reading PEFT adapters: scales folded into B, and every unservable adapter refused by name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from model_builders import (
    AdapterSpec,
    Seq,
    build_adapter,
    build_hf_model,
    hf_greedy,
    load_hf,
    rel_err,
    runner_logits,
)
from safetensors.torch import load_file, save_file

from loraplex.engine.errors import AdapterIncompatible, AdapterLoadError
from loraplex.engine.lora.weights import read_adapter
from loraplex.engine.model.presets import PRESETS
from loraplex.engine.model_runner import ModelRunner

CFG = PRESETS["tiny"]  # hidden 64, intermediate 128, 2 layers, 4 heads / 2 kv heads of 16
PREFIX = "base_model.model.model.layers"


def _write(path: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def _qv(r: int = 4, layer: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, n_out in (("q_proj", 64), ("v_proj", 32)):
        out[f"{PREFIX}.{layer}.self_attn.{m}.lora_A.weight"] = torch.randn(r, 64, generator=g)
        out[f"{PREFIX}.{layer}.self_attn.{m}.lora_B.weight"] = torch.randn(n_out, r, generator=g)
    return out


def _read(path: Path, max_rank: int = 16):
    return read_adapter(path, CFG, max_rank=max_rank, dtype=torch.float32)


def test_reads_modules_and_folds_scale(tmp_path):
    t = _qv(r=4)
    w = _read(_write(tmp_path / "a", t, r=4, lora_alpha=8))
    assert set(w.modules) == {(0, "q_proj"), (0, "v_proj")}
    assert w.max_rank == 4 and w.target_modules == {"q_proj", "v_proj"}
    key = f"{PREFIX}.0.self_attn.q_proj.lora_"
    torch.testing.assert_close(w.modules[(0, "q_proj")].a, t[key + "A.weight"])
    torch.testing.assert_close(w.modules[(0, "q_proj")].b, t[key + "B.weight"] * 2.0)
    rs = _read(_write(tmp_path / "rs", t, r=4, lora_alpha=8, use_rslora=True))
    torch.testing.assert_close(rs.modules[(0, "q_proj")].b, t[key + "B.weight"] * 8 / math.sqrt(4))


def test_rank_and_alpha_pattern(tmp_path):
    t = _qv(r=4)
    t.update({k.replace(".0.", ".1."): v for k, v in _qv(r=2, seed=1).items()})
    w = _read(
        _write(
            tmp_path / "p",
            t,
            r=4,
            lora_alpha=8,
            rank_pattern={"layers.1.self_attn.q_proj": 2, "layers.1.self_attn.v_proj": 2},
            alpha_pattern={"v_proj": 1},
        )
    )
    assert w.modules[(1, "q_proj")].rank == 2
    b = t[f"{PREFIX}.1.self_attn.v_proj.lora_B.weight"]
    torch.testing.assert_close(w.modules[(1, "v_proj")].b, b * 0.5)  # alpha 1 / r 2
    with pytest.raises(AdapterIncompatible, match="rank 2, adapter_config says 4"):
        _read(_write(tmp_path / "bad", t, r=4, lora_alpha=8))


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "peft_type 'PREFIX_TUNING'"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias"),
        ({"lora_bias": True}, "lora_bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"r": 0}, "r must be"),
    ],
)
def test_refuses_config_by_name(tmp_path, config, match):
    with pytest.raises(AdapterIncompatible, match=match):
        _read(_write(tmp_path / "a", _qv(), **config))


def _mutate(name: str) -> dict[str, torch.Tensor]:
    t = _qv()
    qa, qb = (
        f"{PREFIX}.0.self_attn.q_proj.lora_A.weight",
        f"{PREFIX}.0.self_attn.q_proj.lora_B.weight",
    )
    if name == "shape":
        t[qa] = torch.randn(4, 48)
    elif name == "module":
        t[f"{PREFIX}.0.mlp.fc1.lora_A.weight"] = torch.randn(4, 64)
    elif name == "parent":
        t[f"{PREFIX}.0.self_attn.gate_proj.lora_A.weight"] = torch.randn(4, 64)
    elif name == "layer":
        t[qa.replace(".0.", ".7.")] = t[qa].clone()
        t[qb.replace(".0.", ".7.")] = t[qb].clone()
    elif name == "nan":
        t[qb][3, 1] = float("nan")
    elif name == "inf":
        t[qa][0, 0] = float("inf")
    elif name == "int":
        t[qa] = torch.ones(4, 64, dtype=torch.int32)
    elif name == "missing_b":
        del t[qb]
    elif name == "dora":
        t[f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    elif name == "embedding":
        t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.ones(4, 512)
    elif name == "rank":
        t[qa], t[qb] = torch.randn(32, 64), torch.randn(64, 32)
    return t


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("shape", "shape mismatch"),
        ("module", "does not exist in the base"),
        ("parent", "self_attn.gate_proj does not exist"),
        ("layer", "layer 7 does not exist"),
        ("nan", "NaN or Inf"),
        ("inf", "NaN or Inf"),
        ("int", "not a float"),
        ("missing_b", "lora_B weight is missing"),
        ("dora", "DoRA"),
        ("embedding", "not a LoRA A/B weight"),
        ("rank", "rank 32 is outside 1..16"),
    ],
)
def test_refuses_weights_that_do_not_fit(tmp_path, case, match):
    cfg = {"r": 32} if case == "rank" else {}
    with pytest.raises(AdapterIncompatible, match=match):
        _read(_write(tmp_path / case, _mutate(case), **cfg))


def test_unreadable_adapters_are_load_errors(tmp_path):
    with pytest.raises(AdapterLoadError, match="does not exist"):
        _read(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterLoadError, match=r"adapter_config\.json not found"):
        _read(tmp_path / "empty")
    bad_json = _write(tmp_path / "json", _qv())
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="could not be read"):
        _read(bad_json)
    corrupt = _write(tmp_path / "st", _qv())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterLoadError, match="safetensors could not be read"):
        _read(corrupt)
    no_weights = _write(tmp_path / "nw", _qv())
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterLoadError, match="not found"):
        _read(no_weights)


def test_pickle_weights_are_refused(tmp_path):
    path = _write(tmp_path / "pk", _qv())
    (path / "adapter_model.safetensors").unlink()
    torch.save(_qv(), path / "adapter_model.bin")
    with pytest.raises(AdapterIncompatible, match="pickle"):
        _read(path)


def test_runner_reads_peft_adapter_with_patterns_and_layers(tmp_path):
    """rank_pattern / alpha_pattern / layers_to_transform, end to end against PEFT."""
    base = build_hf_model(tmp_path / "base", "llama", seed=3)
    spec = AdapterSpec(
        rank=8,
        targets=("q_proj", "up_proj", "down_proj"),
        seed=4,
        extra={
            "rank_pattern": {"up_proj": 3},
            "alpha_pattern": {"down_proj": 2},
            "layers_to_transform": [1],
        },
    )
    hf = load_hf(base)
    path = build_adapter(hf, tmp_path / "lora", spec)
    assert {k.split(".")[4] for k in load_file(str(path / "adapter_model.safetensors"))} == {"1"}
    runner = ModelRunner(str(base), max_num_seqs=2, max_model_len=64, max_loras=2, num_blocks=64)
    weights = runner.read_adapter(path)
    assert weights.modules[(1, "up_proj")].rank == 3 and (0, "q_proj") not in weights.modules
    runner.write_slot(1, weights)

    from peft import PeftModel

    peft = PeftModel.from_pretrained(hf, str(path))
    prompt = [5, 9, 17, 33, 65, 129, 250]
    tokens, ref = hf_greedy(peft, prompt, 4)
    (got,) = runner_logits(runner, [Seq(prompt, 1, tokens)], 4)
    assert rel_err(got, ref) < 1e-4


def test_dropped_adapters_buffer_is_reused_only_when_nothing_refers_to_it(tmp_path):
    """A dropped adapter's host buffer serves the next read of its size (no fresh pages to
    fault in); while any view of it survives, it is left alone and the view keeps its values."""
    import gc

    from loraplex.engine.lora import weights as weights_mod

    pool = weights_mod._BUFFERS
    pool.clear()
    a = _write(tmp_path / "a", _qv(seed=1))
    tb = _qv(seed=2)
    b = _write(tmp_path / "b", tb)
    key = f"{PREFIX}.0.self_attn.v_proj.lora_"

    w = _read(a)
    ptr, size = w.buffer.data_ptr(), w.buffer.numel()
    a_view, a_vals = w.groups["qkv"].b, w.groups["qkv"].b.clone()
    del w
    gc.collect()
    w2 = _read(b)  # A's view is alive: its memory is not handed out
    assert w2.buffer.data_ptr() != ptr and w2.buffer.numel() == size
    torch.testing.assert_close(a_view, a_vals)

    dropped = {ptr, w2.buffer.data_ptr()}
    del a_view, w2
    gc.collect()
    reused = pool.reused
    w3 = _read(b)  # nothing refers to the dropped buffers now: one of them is taken
    assert pool.reused == reused + 1 and w3.buffer.data_ptr() in dropped
    torch.testing.assert_close(w3.modules[(0, "v_proj")].a, tb[key + "A.weight"])
    torch.testing.assert_close(w3.modules[(0, "v_proj")].b, tb[key + "B.weight"] * 2.0)
    pool.clear()
    fresh = _read(b)
    for g, p in fresh.groups.items():
        torch.testing.assert_close(w3.groups[g].a, p.a)
        torch.testing.assert_close(w3.groups[g].b, p.b)
        torch.testing.assert_close(w3.groups[g].ranks, p.ranks)
