"""FP8 base weights through the real loader, runner and engine (CPU: the dequantizing path).

Each supported checkpoint layout is written here from a tiny random Llama (fp8 block-wise,
fp8 per-tensor, compressed-tensors per-channel, compressed-tensors per-tensor), next to a
dense folder holding the same weights dequantized: the FP8 folder's logits equal the dense
folder's, and stay near the unquantized model's. ``quantization="fp8"`` quantizes at load:
greedy tokens through the whole engine, with adapters, equal HF + PEFT's on the dequantized
weights.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from model_builders import (
    ALL_TARGETS,
    VOCAB,
    AdapterSpec,
    Seq,
    build_adapter,
    build_hf_model,
    hf_greedy,
    load_hf,
    prompts_for,
    rel_err,
    runner_for,
    runner_logits,
)

from loraplex.engine.api import AdapterRef, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.kernels.fp8_linear import FP8, dequantize
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.config import UnsupportedModel
from loraplex.engine.model.fp8 import (
    Fp8Weight,
    checkpoint_quant,
    fuse,
    quantize_per_channel,
)
from loraplex.engine.model.loader import load_model

BLOCK = (16, 16)
FORMATS = ["fp8-block", "fp8-tensor", "ct-channel", "ct-tensor"]


def _quant_config(fmt: str) -> dict:
    if fmt == "fp8-block":
        return {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": list(BLOCK),
        }
    if fmt == "fp8-tensor":
        return {"quant_method": "fp8", "activation_scheme": "static"}
    strategy = fmt.removeprefix("ct-")
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": strategy,
                    "symmetric": True,
                    "dynamic": False,
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "token",
                    "dynamic": True,
                },
            }
        },
    }


def _quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One projection -> (e4m3 weight, its scale tensors named as the format names them)."""
    if fmt == "fp8-block":
        bn, bk = BLOCK
        n, k = w.shape
        amax = w.abs().reshape(n // bn, bn, k // bk, bk).amax((1, 3))
        s = amax / 448
        full = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        return (w / full).clamp(-448, 448).to(FP8), {"weight_scale_inv": s}
    if fmt in ("fp8-tensor", "ct-tensor"):
        s = w.abs().max() / 448
        scales = {"weight_scale": s.reshape(() if fmt == "fp8-tensor" else (1,))}
        scales["input_scale"] = torch.tensor(0.02)  # static activation scale: unused
        return (w / s).to(FP8), scales
    s = w.abs().amax(1, keepdim=True) / 448  # ct-channel: [N, 1]
    return (w / s).to(FP8), {"weight_scale": s}


def write_fp8_checkpoint(src: Path, dst: Path, fmt: str) -> Path:
    """``src``'s projections quantized in ``fmt`` at ``dst``; beside it ``dst-dense`` with
    the same weights dequantized (float32), for the reference."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    out, dense = {}, {}
    for name, t in tensors.items():
        if name.endswith("_proj.weight"):
            q, scales = _quantize(t.float(), fmt)
            out[name] = q
            prefix = name.removesuffix(".weight")
            out |= {f"{prefix}.{k}": v.float().contiguous() for k, v in scales.items()}
            s = next(v for k, v in scales.items() if k != "input_scale").float()
            if fmt == "fp8-block":
                dense[name] = dequantize(q, s, BLOCK, torch.float32)
            else:
                dense[name] = q.float() * s.reshape(-1, 1)
        else:
            out[name] = dense[name] = t
    for folder, weights, quant in (
        (dst, out, True),
        (dst.with_name(dst.name + "-dense"), dense, False),
    ):
        shutil.copytree(src, folder)
        save_file(weights, str(folder / "model.safetensors"))
        cfg = json.loads((folder / "config.json").read_text())
        if quant:
            cfg["quantization_config"] = _quant_config(fmt)
        (folder / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_hf_model(tmp_path_factory.mktemp("fp8") / "base", "llama", seed=3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_checkpoint_loads_as_published(base, fmt, tmp_path):
    path = write_fp8_checkpoint(base, tmp_path / fmt, fmt)
    loaded = load_model(path)
    lw = loaded.weights.layers[0]
    for w in (lw.qkv, lw.o, lw.gate_up, lw.down):
        assert isinstance(w, Fp8Weight) and w.qweight.dtype == FP8
        assert w.block == (BLOCK if fmt == "fp8-block" else None)
    assert loaded.weights.lm_head.dtype == torch.float32  # left unquantized
    prompts = prompts_for(2, VOCAB, seed=4)
    seqs = [Seq(p, -1, prompts[1 - i][:4]) for i, p in enumerate(prompts)]
    got = runner_logits(runner_for(loaded), seqs, 4)
    dense = runner_logits(runner_for(str(path) + "-dense"), seqs, 4)
    full = runner_logits(runner_for(str(base)), seqs, 4)
    for g, d, f in zip(got, dense, full, strict=True):
        assert rel_err(g, d) < 1e-5  # the same weights: FP8 layout read right
        assert rel_err(g, f) < 0.15  # and near the unquantized model


def test_other_quantization_methods_are_refused():
    with pytest.raises(UnsupportedModel, match="gptq"):
        checkpoint_quant({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    int8 = _quant_config("ct-channel")
    int8["config_groups"]["group_0"]["weights"]["type"] = "int"
    with pytest.raises(UnsupportedModel, match="8-bit float"):
        checkpoint_quant({"quantization_config": int8})
    assert checkpoint_quant({}) is None
    ck = checkpoint_quant({"quantization_config": _quant_config("fp8-block")})
    assert ck is not None and ck.block == BLOCK and ck.scale_name == "weight_scale_inv"


def test_quantize_per_channel_round_trip():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=gen) * torch.logspace(-4, 1, 48)[:, None]
    fw = quantize_per_channel(w)
    assert fw.qweight.dtype == FP8 and fw.scale.shape == (48,)
    back = fw.dequantize(torch.float32)
    # round to nearest with 3 mantissa bits: <= 1/16 relative, plus half the subnormal step
    assert ((back - w).abs() <= w.abs() / 16 + fw.scale[:, None] * 2**-10).all()
    assert (fw.qweight.float().abs().amax(1) == 448).all()  # each row's amax is exact
    rel = (back - w).norm() / w.norm()
    assert rel < 0.04, rel


def test_fuse_unaligned_blocks_requantizes():
    gen = torch.Generator().manual_seed(1)
    parts = []
    for n in (24, 16):  # 24 rows: not whole 16-row blocks
        w = torch.randn(n, 32, generator=gen)
        s = torch.full((-(-n // 16), 2), float(w.abs().max() / 448))
        parts.append(Fp8Weight((w / s[0, 0]).to(FP8), s, (16, 16)))
    fused = fuse(parts)
    assert fused.block is None and fused.shape == (40, 32)
    want = torch.cat([p.dequantize(torch.float32) for p in parts])
    assert rel_err(fused.dequantize(torch.float32), want) < 0.07
    aligned = fuse([parts[1], parts[1]])
    assert aligned.block == (16, 16) and aligned.scale.shape == (2, 2)


def _dequantized_copy(base: Path, dst: Path) -> Path:
    """``base`` with every projection per-channel quantized and dequantized (what
    ``quantization="fp8"`` computes with), for HF + PEFT."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(base / "model.safetensors"))
    for name, t in tensors.items():
        if name.endswith("_proj.weight"):
            tensors[name] = quantize_per_channel(t).dequantize(torch.float32)
    shutil.copytree(base, dst)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_engine_quantized_at_load_matches_hf_on_dequantized(base, tmp_path):
    """The whole engine (scheduler, KV pool with a prefix hit, adapter loads) with
    ``quantization="fp8"``: greedy tokens of the base and two adapters equal HF + PEFT's on
    the dequantized weights."""
    from peft import PeftModel

    adapters = [
        build_adapter(base, tmp_path / f"lora{i}", AdapterSpec(r, tuple(ALL_TARGETS), seed=i))
        for i, r in enumerate((8, 16))
    ]
    ref_model = load_hf(_dequantized_copy(base, tmp_path / "deq"))
    peft = PeftModel.from_pretrained(ref_model, str(adapters[0]), adapter_name="0")
    peft.load_adapter(str(adapters[1]), adapter_name="1")
    cfg = EngineConfig(
        block_size=4,
        max_loras=2,
        max_lora_rank=16,
        device="cpu",
        dtype="float32",
        num_gpu_blocks=128,
        quantization="fp8",
    )
    engine = LLMEngine.from_model(str(base), cfg)
    prompts = prompts_for(3, VOCAB, seed=7)
    prompts.append([*prompts[1], 5, 6])  # a prefix hit on the adapter-0 request
    which = [None, 0, 1, 0]
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6)
    got: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    for batch in ((0, 1, 2), (3,)):
        for i in batch:
            a = which[i]
            ref = None if a is None else AdapterRef(f"fp8-{a}@v1", str(adapters[a]))
            engine.add_request(Request(f"r{i}", prompts[i], greedy, ref))
            got[f"r{i}"] = []
        for _ in range(3000):
            for o in engine.step():
                got[o.request_id] += [t for c in o.choices for t in c.token_ids]
                cached[o.request_id] = o.cached_tokens
            if not engine.has_unfinished():
                break
            if not engine.last_step_ran:
                time.sleep(0.002)
    for i, p in enumerate(prompts):
        a = which[i]
        if a is None:
            with peft.disable_adapter():
                want = hf_greedy(peft, p, 6)[0]
        else:
            peft.set_adapter(str(a))
            want = hf_greedy(peft, p, 6)[0]
        assert got[f"r{i}"] == want, i
    assert cached["r3"] == len(prompts[1]) // 4 * 4  # r1's full blocks, FP8 base or not
    engine.shutdown()


@pytest.mark.parametrize("kind", ["phi3", "gemma3"])
def test_quantize_at_load_across_families(kind, tmp_path):
    """Phi-3 (fused checkpoint names) and Gemma 3 (its norms, GeGLU, local
    layers): quantized at load, the runner's logits equal those of the per-channel
    dequantized checkpoint."""
    base = build_hf_model(tmp_path / kind, kind, seed=5)
    loaded = load_model(str(base), quantization="fp8")
    assert isinstance(loaded.weights.layers[0].qkv, Fp8Weight)
    prompts = prompts_for(2, VOCAB, seed=6)
    seqs = [Seq(p, -1, prompts[1 - i][:3]) for i, p in enumerate(prompts)]
    got = runner_logits(runner_for(loaded), seqs, 3)
    want = runner_logits(runner_for(str(_dequantized_copy(base, tmp_path / "deq"))), seqs, 3)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-5


def test_moe_experts_stay_dense():
    lw = load_model("dummy:tiny-moe", quantization="fp8").weights.layers[0]
    assert isinstance(lw.qkv, Fp8Weight) and isinstance(lw.o, Fp8Weight)
    assert isinstance(lw.gate_up, torch.Tensor) and lw.gate_up.dim() == 3


def test_quantization_setting_is_validated():
    with pytest.raises(Exception, match="quantization"):
        EngineConfig(quantization="int4").validate()
    with pytest.raises(Exception, match="tensor_parallel_size"):
        EngineConfig(quantization="fp8", tensor_parallel_size=2).validate()
    with pytest.raises(UnsupportedModel):
        load_model("dummy:tiny", quantization="int4")


# ---- GPU: the FP8 kernels in the runner (bf16, CUDA graphs) ------------------------------------


def _dequantized(loaded, dtype):
    """``loaded`` with every FP8 projection replaced by its dequantized dense weight."""
    import dataclasses

    layers = [
        dataclasses.replace(
            lw,
            **{
                n: getattr(lw, n).dequantize(dtype)
                for n in ("qkv", "o", "gate_up", "down")
                if isinstance(getattr(lw, n), Fp8Weight)
            },
        )
        for lw in loaded.weights.layers
    ]
    weights = dataclasses.replace(loaded.weights, layers=layers)
    return dataclasses.replace(loaded, weights=weights)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with FP8 (compute capability >= 8.9)",
)
@pytest.mark.parametrize("fmt", [None, "fp8-block"])
def test_gpu_runner_fp8_matches_dequantized_bf16(base, fmt, tmp_path):
    """Decode through CUDA graphs with three adapters, FP8 (quantized at load, or a block-wise
    checkpoint) against the same weights dequantized to bf16; the warm-up's launch-config
    sweep writes its cache file, and a second runner reads it instead of sweeping; all that
    weight-only. Then with FP8 activations from 8 tokens (the prefill steps), and at every
    step (the default: decode through the Triton GEMM's ``a8`` configs, which a runner on the
    default tunes under their own keys): FP8 activations add their own rounding, 9-21 % of the
    largest logit on this random model (a CPU emulation of it), so that bound only catches a
    broken path; the kernel tests check their precision per GEMM."""
    from loraplex.engine.model_runner import ModelRunner

    model = str(base) if fmt is None else str(write_fp8_checkpoint(base, tmp_path / fmt, fmt))
    loaded = load_model(model, dtype=torch.bfloat16, device="cuda", quantization="fp8")
    adapters = [
        build_adapter(base, tmp_path / f"lora{i}", AdapterSpec(r, tuple(ALL_TARGETS), seed=i))
        for i, r in enumerate((8, 16, 64))
    ]
    kw = dict(device="cuda", block_size=16, max_num_seqs=8, max_model_len=128, max_loras=4,
              num_blocks=128)  # fmt: skip
    cache = tmp_path / "kernel-configs"
    weight_only = 1 << 30  # fp8_w8a8_min_tokens past any step
    fp8 = ModelRunner(loaded, kernel_config_dir=cache, fp8_w8a8_min_tokens=weight_only, **kw)
    assert fp8.graphs is not None and fp8.tuning_report
    assert fp8.launch_configs.path is not None and fp8.launch_configs.path.is_file()
    again = ModelRunner(_dequantized(loaded, torch.bfloat16), kernel_config_dir=cache, **kw)
    assert not again.tuning_report  # no FP8 weights: nothing to tune
    ref = again
    for r in (fp8, ref):
        for slot, path in zip((3, 0, 1), adapters, strict=True):
            r.write_slot(slot, r.read_adapter(path))
    prompts = prompts_for(4, VOCAB, seed=11)
    seqs = [
        Seq(p, s, prompts[(i + 1) % 4][:6])
        for i, (p, s) in enumerate(zip(prompts, (-1, 3, 0, 1), strict=True))
    ]
    got = runner_logits(fp8, seqs, 6)
    want = runner_logits(ref, seqs, 6)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g.float(), w.float()) < 3e-2
    if fmt is None:
        for min_tokens in (8, 1):
            fp8.model.fp8.w8a8_min_tokens = min_tokens
            assert fp8.graphs is not None
            fp8.graphs.capture()
            for g, w in zip(runner_logits(fp8, seqs, 6), want, strict=True):
                assert torch.isfinite(g).all() and rel_err(g.float(), w.float()) < 0.35
    second = ModelRunner(load_model(model, dtype=torch.bfloat16, device="cuda",
                                    quantization="fp8"), kernel_config_dir=cache,
                         fp8_w8a8_min_tokens=weight_only, **kw)  # fmt: skip
    assert not second.tuning_report  # read from the cache file
    if fmt is None:  # the default (FP8 activations at every step) tunes its own keys
        third = ModelRunner(load_model(model, dtype=torch.bfloat16, device="cuda",
                                       quantization="fp8"), kernel_config_dir=cache, **kw)  # fmt: skip
        assert third.tuning_report and all(k.endswith(":a8") for k in third.tuning_report)
        for slot, path in zip((3, 0, 1), adapters, strict=True):
            third.write_slot(slot, third.read_adapter(path))
        for g, w in zip(runner_logits(third, seqs, 6), want, strict=True):
            assert torch.isfinite(g).all() and rel_err(g.float(), w.float()) < 0.35
