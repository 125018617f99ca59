"""The one-copy adapter reader against the reader it replaced (kept in
``benchmarks/adapter_load_old.py``): the same packed weights for every rank, alpha, rsLoRA,
pattern, layer subset and dtype, and the same error, word for word, for every bad adapter,
including adapters with several faults (the first module in order decides)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraplex.engine.errors import AdapterIncompatible, AdapterLoadError
from loraplex.engine.lora.weights import read_adapter
from loraplex.engine.model.presets import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from adapter_load_old import read_adapter_old

CFG = PRESETS["tiny"]  # hidden 64, intermediate 128, 2 layers, q 64 / kv 32
PREFIX = "base_model.model.model.layers"
OUT = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64, "gate_proj": 128}
OUT |= {"up_proj": 128, "down_proj": 64}
IN = {m: 128 if m == "down_proj" else 64 for m in OUT}
PARENT = {m: "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for m in OUT}


def _tensors(ranks: dict[tuple[int, str], int], dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for (layer, m), r in ranks.items():
        key = f"{PREFIX}.{layer}.{PARENT[m]}.{m}.lora_"
        out[key + "A.weight"] = torch.randn(r, IN[m], generator=g).to(dtype)
        out[key + "B.weight"] = torch.randn(OUT[m], r, generator=g).to(dtype)
    return out


def _write(path: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def _both(path: Path, dtype: torch.dtype, max_rank: int = 16):
    new = read_adapter(path, CFG, max_rank=max_rank, dtype=dtype)
    old = read_adapter_old(path, CFG, max_rank=max_rank, dtype=dtype)
    return old, new


ALL = tuple(OUT)
VARIANTS = {
    # name: (ranks by (layer, module), adapter_config)
    "all-r16": ({(i, m): 16 for i in (0, 1) for m in ALL}, {"r": 16, "lora_alpha": 16}),
    "qv-r8-alpha32": ({(i, m): 8 for i in (0, 1) for m in ("q_proj", "v_proj")}, {"r": 8, "lora_alpha": 32}),
    "rslora": ({(i, m): 4 for i in (0, 1) for m in ALL}, {"r": 4, "lora_alpha": 8, "use_rslora": True}),
    "scale-not-power-of-2": ({(i, m): 12 for i in (0, 1) for m in ALL}, {"r": 12, "lora_alpha": 7}),
    "layer-1-only": ({(1, m): 8 for m in ("o_proj", "down_proj")}, {"r": 8, "lora_alpha": 8}),
    "rank-pattern": (
        {(0, "q_proj"): 8, (0, "k_proj"): 2, (0, "v_proj"): 8, (1, "q_proj"): 8, (1, "up_proj"): 3},
        {"r": 8, "lora_alpha": 16, "rank_pattern": {"k_proj": 2, "up_proj": 3},
         "alpha_pattern": {"layers.1.self_attn.q_proj": 4, "up_proj": 5}},
    ),
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.bfloat16),
        (torch.float64, torch.float16),
    ],
)
def test_same_weights_as_the_old_reader(tmp_path, variant, src, dst):
    ranks, cfg = VARIANTS[variant]
    old, new = _both(_write(tmp_path / "a", _tensors(ranks, src, seed=1), **cfg), dst)
    assert set(new.groups) == set(old.groups)
    # the old reader scaled in float64 then rounded; the new one scales in the target
    # dtype: equal, or one rounding step apart where the scale is not a power of two
    tol = {torch.float32: 2e-7, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dst]
    for g, o in old.groups.items():
        n = new.groups[g]
        assert n.a.dtype == dst and n.b.dtype == dst
        torch.testing.assert_close(n.a, o.a, rtol=0, atol=0)
        torch.testing.assert_close(n.b, o.b, rtol=tol, atol=0)
        assert torch.equal(n.ranks, o.ranks)
    assert set(new.modules) == set(old.modules) == set(ranks)
    for k, m in old.modules.items():
        torch.testing.assert_close(new.modules[k].b, m.b, rtol=tol, atol=0)
    assert new.max_rank == max(ranks.values())
    assert new.nbytes() >= sum(
        t.numel() * t.element_size() for o in new.groups.values() for t in (o.a, o.b)
    )


def _bad(case: str) -> tuple[dict[str, torch.Tensor], dict]:
    t = _tensors(
        {(i, m): 4 for i in (0, 1) for m in ("q_proj", "v_proj", "down_proj")}, torch.float32, 2
    )
    q0, v1 = f"{PREFIX}.0.self_attn.q_proj.lora_", f"{PREFIX}.1.self_attn.v_proj.lora_"
    cfg: dict = {}
    if case == "nan-late":
        t[v1 + "B.weight"][0, 0] = float("nan")
    elif case == "inf-early-shape-late":  # layer 0 q holds Inf, layer 1 v has a bad shape
        t[q0 + "A.weight"][1, 1] = float("inf")
        t[v1 + "A.weight"] = torch.randn(4, 48)
    elif case == "shape-early-nan-late":
        t[q0 + "A.weight"] = torch.randn(4, 48)
        t[v1 + "B.weight"][0, 0] = float("nan")
    elif case == "missing-late-nan-early":
        t[q0 + "B.weight"][2, 0] = float("-inf")
        del t[v1 + "B.weight"]
    elif case == "rank-config":
        cfg = {"r": 8}
    elif case == "rank-too-big":
        t[q0 + "A.weight"], t[q0 + "B.weight"] = torch.randn(32, 64), torch.randn(64, 32)
        cfg = {"rank_pattern": {"layers.0.self_attn.q_proj": 32}}
    elif case == "int-dtype":
        t[v1 + "A.weight"] = torch.ones(4, 64, dtype=torch.int8)
    elif case == "two-bad-keys":
        t[f"{PREFIX}.0.mlp.fc1.lora_A.weight"] = torch.ones(4, 64)
        t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.ones(
            4, 8, dtype=torch.float16
        )
    elif case == "layer":
        t[q0.replace(".0.", ".5.") + "A.weight"] = torch.randn(4, 64)
    elif case == "nan-overflow-only":  # finite in float64, Inf once in float16: accepted, as before
        t[q0 + "A.weight"] = t[q0 + "A.weight"].double()
        t[q0 + "A.weight"][0, 0] = 1e300
    elif case == "dora":
        t[f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    return t, cfg


@pytest.mark.parametrize(
    "case",
    [
        "nan-late", "inf-early-shape-late", "shape-early-nan-late", "missing-late-nan-early",
        "rank-config", "rank-too-big", "int-dtype", "two-bad-keys", "layer", "nan-overflow-only",
        "dora",
    ],
)  # fmt: skip
def test_same_refusal_as_the_old_reader(tmp_path, case):
    t, cfg = _bad(case)
    path = _write(tmp_path / case, t, **cfg)
    errors = []
    for read in (read_adapter_old, read_adapter):
        try:
            read(path, CFG, max_rank=16, dtype=torch.float16)
            errors.append(None)
        except (AdapterIncompatible, AdapterLoadError) as e:
            errors.append((type(e), str(e)))
    assert errors[0] == errors[1]
    assert (errors[0] is None) == (case == "nan-overflow-only")


def test_unaligned_and_truncated_files(tmp_path):
    """A header that does not tile the data, and a file cut short, are read errors."""
    path = _write(tmp_path / "a", _tensors({(0, "q_proj"): 4}, torch.float32, 3))
    st = path / "adapter_model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(raw[:-4])
    with pytest.raises(AdapterLoadError, match="safetensors could not be read"):
        read_adapter(path, CFG, max_rank=16, dtype=torch.float32)
    st.write_bytes(raw + b"\0" * 4)
    with pytest.raises(AdapterLoadError, match="safetensors could not be read"):
        read_adapter(path, CFG, max_rank=16, dtype=torch.float32)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header[f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"]["dtype"] = "X9"
    body = json.dumps(header).encode()
    st.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    with pytest.raises(AdapterLoadError, match="unknown dtype"):
        read_adapter(path, CFG, max_rank=16, dtype=torch.float32)


def _rss_kib() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4  # resident pages of 4 KiB


def test_host_memory_flat_over_load_and_unload(tmp_path):
    """Load an adapter into the loader's host tier and drop it, 1,000 times: the resident
    memory and the number of mappings stay flat (the mapping and the packed buffer go with
    the weights)."""
    from functools import partial

    from loraplex.engine.api import AdapterRef
    from loraplex.engine.lora.loader import AdapterLoader

    ranks = {(i, m): 16 for i in (0, 1) for m in ALL}
    path = _write(tmp_path / "a", _tensors(ranks, torch.float32, 4), r=16, lora_alpha=16)
    read = partial(read_adapter, config=CFG, max_rank=16, dtype=torch.float32)
    loader = AdapterLoader(read, workers=1, max_host_bytes=1 << 30)
    ref = AdapterRef("k", str(path))

    def cycle(n: int) -> None:
        for _ in range(n):
            assert loader.start(ref)
            while loader.num_loading:
                # not a hot loop: it would hold the GIL from the worker for its switch
                # interval at every release (this test took 400 s on the 2-core CI box)
                time.sleep(0.0005)
                assert not loader.collect()
            assert loader.host_bytes > 0 and loader.drop("k") and loader.host_bytes == 0

    try:
        cycle(50)
        rss, maps = _rss_kib(), Path("/proc/self/maps").read_text().count("\n")
        cycle(1000)
        assert _rss_kib() - rss < 8192, f"resident memory grew {_rss_kib() - rss} KiB"
        assert Path("/proc/self/maps").read_text().count("\n") <= maps + 4  # no mapping leaks
        assert loader.loads == 1050
    finally:
        loader.shutdown()


@pytest.mark.parametrize(
    "entry, message",
    [
        ([1, 2], "header entry is not an object"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}, None),  # extra key
        ({"dtype": 5, "shape": [2], "data_offsets": [0, 8]}, "unknown dtype 5"),
        ({"dtype": "F32", "shape": (2,), "data_offsets": [0, 8]}, None),  # JSON: a list
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "shape must be a list"),
        ({"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}, "shape must be a list"),
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "shape must be a list"),
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "shape must be a list"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "data_offsets must be"),
        ({"dtype": "F32", "shape": [2], "data_offsets": "0,8"}, "data_offsets must be"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}, "data_offsets must be"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "data_offsets must be"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "data_offsets must be"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "byte length does not match"),
        ({"dtype": "F32", "shape": [], "data_offsets": [0, 8]}, "byte length does not match"),
        ({"dtype": "F32", "shape": [2, 0], "data_offsets": [0, 8]}, "byte length does not match"),
    ],
)
def test_header_entry_checks(tmp_path, entry, message):
    """Each tensor's header entry is checked as safetensors checks it (a shape of
    non-negative ints, [begin, end] offsets, a byte length that matches), with its own
    message; a well-formed one opens (the JSON has no tuples: a tuple is written as a list)."""
    from loraplex.engine.lora.safetensors_file import SafetensorsError, open_safetensors

    body = json.dumps({"t": entry}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 8)
    if message is None:
        (e,) = open_safetensors(path).entries
        assert (e.name, e.dtype, e.shape, e.begin, e.end) == ("t", torch.float32, (2,), 0, 8)
        return
    with pytest.raises(SafetensorsError, match=message):
        open_safetensors(path)


def test_adapters_of_one_layout_share_the_checks_not_the_data(tmp_path):
    """Adapters with the same header (one base, rank and targets) reuse the header's entries
    and the validated plan, never what depends on the file or its config: another adapter's
    weights, a NaN in one, another alpha (scale), a config whose rank disagrees, a smaller
    max_rank; each read equals the old reader's, error for error."""
    ranks = {(i, m): 8 for i in (0, 1) for m in ALL}
    cases = {
        "a": (_tensors(ranks, torch.bfloat16, 1), {"r": 8, "lora_alpha": 16}),
        "b": (_tensors(ranks, torch.bfloat16, 2), {"r": 8, "lora_alpha": 16}),
        "alpha": (_tensors(ranks, torch.bfloat16, 3), {"r": 8, "lora_alpha": 4}),
        "r-says-4": (_tensors(ranks, torch.bfloat16, 4), {"r": 4, "lora_alpha": 16}),
    }
    nan = _tensors(ranks, torch.bfloat16, 5)
    nan[f"{PREFIX}.1.mlp.up_proj.lora_B.weight"][3, 2] = float("nan")
    cases["nan"] = (nan, {"r": 8, "lora_alpha": 16})
    paths = {name: _write(tmp_path / name, t, **cfg) for name, (t, cfg) in cases.items()}
    raws = [(p / "adapter_model.safetensors").read_bytes() for p in paths.values()]
    assert (
        len({r[8 : 8 + int.from_bytes(r[:8], "little")] for r in raws}) == 1
    )  # one layout: the caches' keys differ only by config
    for max_rank in (16, 16, 4):  # twice: the second pass reads with every cache warm
        for name, path in paths.items():
            got = []
            for read in (read_adapter_old, read_adapter):
                try:
                    w = read(path, CFG, max_rank=max_rank, dtype=torch.float32)
                    got.append({k: (m.a.clone(), m.b.clone()) for k, m in w.modules.items()})
                except (AdapterIncompatible, AdapterLoadError) as e:
                    got.append((type(e), str(e)))
            old, new = got
            if isinstance(old, tuple):
                assert new == old, name
                continue
            assert old.keys() == new.keys()
            for k in old:
                assert torch.equal(old[k][0], new[k][0]) and torch.equal(old[k][1], new[k][1])
    assert not isinstance(got[1], dict)  # max_rank 4 refuses rank 8 (the last read)
