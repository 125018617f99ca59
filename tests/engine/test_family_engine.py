"""Qwen3, Mistral-Nemo, Phi-3/4 and Gemma 2/3 through the whole engine (scheduler, KV pool, adapter
loads): each request's greedy tokens from one mixed batch of the base and three adapters
equal HF + PEFT's for it alone, also with preemption, chunked prefill and a prefix hit."""

from __future__ import annotations

import random

import msgspec
import pytest
from engine_drive import drive, drive_mixed, mixed_requests
from model_builders import build_adapter, build_hf_model, hf_greedy, load_hf
from test_family_parity import FAMILIES

from loraplex.engine.api import Request, SamplingParams
from loraplex.engine.block_manager import LocalBlocks, WindowedBlocks
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.config import FUSED_MODULES, SPLIT_MODULES
from loraplex.engine.model_info import describe

MAX_TOKENS = 6
GREEDY = dict(temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS)


def _family(kind: str, tmp_path_factory):
    """(kind, model dir, adapter dirs, HF reference: (adapter index or None, prompt[, steps])
    -> tokens)."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp(f"engine-{kind}")
    base = build_hf_model(root / "base", kind, seed=9)
    adapters = [build_adapter(base, root / f"lora{i}", s) for i, s in enumerate(FAMILIES[kind])]
    peft = PeftModel.from_pretrained(load_hf(base), str(adapters[0]), adapter_name="0")
    for i, a in enumerate(adapters[1:], 1):
        peft.load_adapter(str(a), adapter_name=str(i))

    def reference(adapter: int | None, prompt: list[int], steps: int = MAX_TOKENS) -> list[int]:
        if adapter is None:
            with peft.disable_adapter():
                return hf_greedy(peft, prompt, steps)[0]
        peft.set_adapter(str(adapter))
        return hf_greedy(peft, prompt, steps)[0]

    return kind, base, adapters, reference


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    return _family(request.param, tmp_path_factory)


# local layers beside global ones (their own tables), or every layer local (one table)
WINDOW_GROUPS = ("gemma2", "gemma3", "qwen2-window")
WINDOWED = (*WINDOW_GROUPS, "mistral-window")


@pytest.fixture(scope="module", params=WINDOWED)
def windowed_family(request, tmp_path_factory):
    return _family(request.param, tmp_path_factory)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_gpu_blocks": 12, "max_loras": 2, "max_num_batched_tokens": 8}],
    ids=["batch", "preemption-chunked"],
)
def test_family_engine_matches_hf(family, overrides):
    kind, base, adapters, reference = family
    cfg = dict(block_size=4, max_loras=4, max_lora_rank=32, device="cpu", dtype="float32")
    if "num_gpu_blocks" in overrides and kind in WINDOWED:
        # the local layer gives its blocks behind the window back: a smaller pool preempts
        overrides = {**overrides, "num_gpu_blocks": 8}
    engine = LLMEngine.from_model(
        str(base), EngineConfig(**{"num_gpu_blocks": 256, **cfg, **overrides})
    )
    want = FUSED_MODULES if "phi" in kind else SPLIT_MODULES
    assert describe(engine, name=kind, model=str(base)).adapter_shape.modules == want
    reqs, names = mixed_requests(kind, adapters, [None, 0, 1, 2], GREEDY, prefix_of=1)
    got, cached = drive_mixed(engine, reqs)
    for r in reqs:
        assert isinstance(r.prompt, list)
        assert got[r.request_id] == reference(names[r.request_id], r.prompt), r.request_id
    stats = engine.stats()
    if "num_gpu_blocks" in overrides:
        assert stats.preemptions > 0
    else:
        assert cached["p"] == len(reqs[1].prompt) // 4 * 4  # r1's full blocks
    assert engine.blocks.is_whole() and engine.slots.is_idle()
    engine.shutdown()


def test_sliding_window_layers_give_their_blocks_back(windowed_family):
    """Gemma's (and Qwen2's) local layers read a table of their own over the same pool of
    blocks (Mistral's, all local, one table), and the blocks behind their window go back to
    it as the requests run past several windows
    (two choices forking off one prompt among them) in a pool small enough to preempt:
    every token still equals HF + PEFT's, and nothing leaks."""
    _sliding_window_run(windowed_family, "cpu")


@pytest.mark.gpu
def test_sliding_window_layers_on_the_gpu(windowed_family):
    """The same through the GPU's kernels and CUDA graphs (fp32: the same greedy tokens)."""
    _sliding_window_run(windowed_family, "cuda")


def _sliding_window_run(windowed_family, device: str) -> None:
    kind, base, adapters, reference = windowed_family
    grouped = kind in WINDOW_GROUPS
    cfg = EngineConfig(
        num_gpu_blocks=14 if grouped else 6, max_num_seqs=3, max_num_batched_tokens=8, block_size=4,
        max_loras=4, max_lora_rank=32, device=device, dtype="float32",
    )  # fmt: skip
    engine = LLMEngine.from_model(str(base), cfg)
    runner = engine.runner
    if grouped:
        # one local layer, one global: a block id is one layer's, twice as many as of both
        assert runner.kv_window == 5 and runner.kv_local_groups == 1
        assert runner.num_blocks == 28 and isinstance(engine.blocks, WindowedBlocks)
    else:  # both layers local: one table of blocks of both, given back behind the window,
        # so 6 blocks serve requests of 43 tokens (11 blocks), preempting one another
        assert runner.kv_window == 5 and runner.kv_local_groups == 0
        assert runner.num_blocks == 6 and isinstance(engine.blocks, LocalBlocks)
    long = dict(temperature=0.0, ignore_eos=True, max_tokens=24)
    reqs, names = mixed_requests(kind, adapters, [None, 0, 1, 2], long, prefix_of=1)
    reqs[3].sampling = msgspec.structs.replace(reqs[3].sampling, n=2)  # siblings fork off it
    got, _ = drive_mixed(engine, reqs)
    for r in reqs:
        assert isinstance(r.prompt, list)
        want = reference(names[r.request_id], r.prompt, 24)
        assert got[r.request_id] == want * r.sampling.n, r.request_id
    assert engine.stats().preemptions > 0
    assert engine.blocks.is_whole() and engine.slots.is_idle()
    engine.shutdown()


def test_sliding_window_forks_never_hold_more_than_the_pool(windowed_family):
    """n = 2 on a prompt whose blocks, all held until the sibling forks, would not fit the
    pool: the first choice gives its blocks back as usual (the sibling recomputes the
    prompt) instead of preempting itself forever; a shorter prompt holds and shares. (No
    prefix cache: a hit on its own blocks after the preemption would hide the loop.)"""
    kind, base, _, reference = windowed_family
    grouped = kind in WINDOW_GROUPS
    cfg = EngineConfig(
        num_gpu_blocks=14 if grouped else 6, max_num_seqs=3, max_num_batched_tokens=8,
        block_size=4, max_loras=4, max_lora_rank=32, device="cpu", dtype="float32",
        enable_prefix_caching=False,
    )  # fmt: skip
    engine = LLMEngine.from_model(str(base), cfg)
    assert engine.blocks.num_blocks == (28 if grouped else 6)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4, n=2)
    rng = random.Random(3)
    long, short = ([rng.randrange(3, 300) for _ in range(n)] for n in (60, 12))
    assert not engine.blocks.fits_held(len(long) + 4) and engine.blocks.fits_held(16)
    reqs = [Request("long", long, params), Request("short", short, params)]
    got = drive(engine, reqs, {})
    for r in reqs:
        assert got[r.request_id] == reference(None, r.prompt, 4) * 2, r.request_id
    assert engine.blocks.is_whole()
    engine.shutdown()
