"""The runner on CUDA: Triton kernels vs transformers+PEFT, decode CUDA graphs vs eager,
and KV pool sizing from measured memory. Run with ``pytest -m gpu`` on a GPU machine."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from model_builders import (
    ALL_TARGETS,
    AdapterSpec,
    Seq,
    build_adapter,
    build_hf_model,
    hf_greedy,
    load_hf,
    rel_err,
    runner_logits,
)

from loraplex.engine.batch import ScheduledBatch, SeqChunk
from loraplex.engine.model.loader import load_model
from loraplex.engine.model_runner import ModelRunner

pytestmark = pytest.mark.gpu

SPECS = [
    AdapterSpec(rank=4, targets=("q_proj", "v_proj"), alpha=8, seed=1),
    AdapterSpec(rank=16, targets=tuple(ALL_TARGETS), alpha=32, rslora=True, seed=2),
    AdapterSpec(rank=64, targets=("o_proj", "down_proj"), alpha=16, seed=3),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-llama")
    base = build_hf_model(root / "base", "llama")
    hf = load_hf(base)
    adapters = [build_adapter(hf, root / f"lora{i}", s) for i, s in enumerate(SPECS)]
    return base, hf, adapters


def _runner(model, *, eager: bool, dtype=torch.float32, **kw) -> ModelRunner:
    args = dict(block_size=16, max_num_seqs=8, max_model_len=128, max_loras=4, num_blocks=128)
    args.update(kw)
    return ModelRunner(model, device="cuda", dtype=dtype, enforce_eager=eager, **args)


def test_triton_path_matches_hf_with_adapters(tiny):
    from peft import PeftModel

    base, hf, adapters = tiny
    runner = _runner(str(base), eager=False)
    assert runner.graphs is not None
    slots = [3, 0, 1]
    for slot, path in zip(slots, adapters, strict=True):
        runner.write_slot(slot, runner.read_adapter(path))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 21, 9, 33)]
    peft = PeftModel.from_pretrained(hf, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        peft.load_adapter(str(a), adapter_name=f"a{i}")
    with peft.disable_adapter():
        refs = [hf_greedy(peft, prompts[0], 16)]
    for i in range(3):
        peft.set_adapter(f"a{i}")
        refs.append(hf_greedy(peft, prompts[i + 1], 16))
    peft.unload()
    seqs = [Seq(prompts[0], -1, refs[0][0])]
    seqs += [Seq(p, s, r[0]) for p, s, r in zip(prompts[1:], slots, refs[1:], strict=True)]
    got = runner_logits(runner, seqs, 16)
    for i, (logits, (_, ref)) in enumerate(zip(got, refs, strict=True)):
        # tf32 may be on for matmuls on the GPU; the kernels accumulate in float32
        assert rel_err(logits, ref) < 2e-3, f"sequence {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_graph_replay_equals_eager(tiny, dtype):
    base, _, adapters = tiny
    loaded = load_model(str(base), dtype=dtype, device="cuda")
    graphed, eager = _runner(loaded, eager=False), _runner(loaded, eager=True)
    assert graphed.graphs is not None and eager.graphs is None
    for r in (graphed, eager):
        for slot, path in enumerate(adapters):
            r.write_slot(slot, r.read_adapter(path))
    g = torch.Generator().manual_seed(1)
    for n_seqs in (1, 3, 8, 5):  # buckets 1, 4, 8 (padded), and a smaller step after a bigger
        slots = [(-1, 0, 1, 2)[i % 4] for i in range(n_seqs)]
        lens = torch.randint(1, 40, (n_seqs,), generator=g).tolist()
        prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in lens]
        tables = [list(range(i * 8, (i + 1) * 8)) for i in range(n_seqs)]
        outs = []
        for r in (graphed, eager):
            pre = [SeqChunk(i, p, 0, tables[i], slots[i], True) for i, p in enumerate(prompts)]
            r.execute(ScheduledBatch(pre))
            steps = []
            for step in range(4):
                dec = [
                    SeqChunk(i, [7 + step], len(p) + step, tables[i], slots[i], True)
                    for i, p in enumerate(prompts)
                ]
                batch = ScheduledBatch(dec)
                assert batch.is_decode
                steps.append(r.execute(batch).clone())
            outs.append(torch.stack(steps))
        # bf16: the kernels may pick another tiling for the padded graph batch (DESIGN.md's
        # bf16 tolerance); float32 shows that the inputs and the math are the same
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        err = rel_err(outs[0], outs[1])
        assert err < tol, f"{n_seqs} sequences: graph vs eager relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_graph_replay_equals_eager(tiny, dtype):
    """Prefill and mixed steps replayed from the piecewise graphs (padded to their bucket)
    give the eager forward's logits; a step past the largest bucket runs eagerly."""
    base, _, adapters = tiny
    loaded = load_model(str(base), dtype=dtype, device="cuda")
    graphed = _runner(loaded, eager=False, max_num_batched_tokens=96)
    eager = _runner(loaded, eager=True)
    pg = graphed.prefill_graphs
    assert pg is not None and eager.prefill_graphs is None and pg.buckets == [16, 32, 64, 96]
    keys: list[tuple[int, int]] = []
    run = pg.run
    pg.run = lambda host, key, *a, **k: keys.append(key) or run(host, key, *a, **k)
    for r in (graphed, eager):
        for slot, path in enumerate(adapters):
            r.write_slot(slot, r.read_adapter(path))
    g = torch.Generator().manual_seed(3)
    slots = [-1, 0, 1, 2, 1]
    tables = [list(range(i * 8, (i + 1) * 8)) for i in range(len(slots))]

    def chunk(i: int, n: int, start: int) -> SeqChunk:
        ids = torch.randint(3, 320, (n,), generator=g).tolist()
        return SeqChunk(i, ids, start, tables[i], slots[i], True)

    steps = [
        [chunk(0, 9, 0), chunk(1, 5, 0)],  # 14 tokens: bucket 16, rank 4
        [chunk(0, 1, 9), chunk(1, 1, 5), chunk(2, 30, 0)],  # mixed, 32: rank 16
        [chunk(0, 1, 10), chunk(2, 1, 30), chunk(3, 40, 0), chunk(4, 7, 0)],  # 49: rank 64
        [chunk(1, 1, 6), chunk(3, 1, 40), chunk(4, 100, 7)],  # 102 tokens: eager
        [chunk(0, 20, 11)],  # the base alone, 20 tokens
    ]
    for n, step in enumerate(steps):
        got = [r.execute(ScheduledBatch(step)).clone() for r in (graphed, eager)]
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        err = rel_err(got[0], got[1])
        assert err < tol, f"step {n}: graph vs eager relative error {err:.2e}"
    assert keys == [(16, 16), (32, 16), (64, 64), (32, 0)]
    del pg.run  # the wrapper's reference cycle would keep the runner's memory after the test


def test_decode_lora_beside_equals_in_line(tiny):
    # decode LoRA on the side stream (deltas joined after each base GEMM) gives the logits
    # of the same forward with every kernel in line on one stream (float32: same math)
    base, _, adapters = tiny
    runner = _runner(str(base), eager=True)
    assert runner.model.side_stream is not None
    for slot, path in enumerate(adapters):
        runner.write_slot(slot, runner.read_adapter(path))
    g = torch.Generator().manual_seed(2)
    n_seqs = 7
    slots = [(-1, 0, 1, 2)[i % 4] for i in range(n_seqs)]
    prompts = [torch.randint(3, 320, (9 + i,), generator=g).tolist() for i in range(n_seqs)]
    tables = [list(range(i * 8, (i + 1) * 8)) for i in range(n_seqs)]
    runner.execute(
        ScheduledBatch(
            [SeqChunk(i, p, 0, tables[i], slots[i], True) for i, p in enumerate(prompts)]
        )
    )
    dec = ScheduledBatch(
        [SeqChunk(i, [11], len(p), tables[i], slots[i], True) for i, p in enumerate(prompts)]
    )
    beside = runner.execute(dec).clone()
    side, runner.model.side_stream = runner.model.side_stream, None
    try:
        in_line = runner.execute(dec).clone()
    finally:
        runner.model.side_stream = side
    assert rel_err(beside, in_line) < 1e-5
    with_lora = torch.tensor([s >= 0 for s in slots])
    dec_base = ScheduledBatch(
        [SeqChunk(i, [11], len(p), tables[i], -1, True) for i, p in enumerate(prompts)]
    )
    base_logits = runner.execute(dec_base)
    assert rel_err(beside[with_lora], base_logits[with_lora]) > 1e-3, "adapters had no effect"


def test_kv_pool_is_sized_from_free_memory():
    gc.collect()  # what earlier tests left (their runners' graph pools) is not this runner's
    torch.cuda.empty_cache()
    loaded = load_model("dummy:llama3-1b", dtype=torch.bfloat16, device="cuda")
    free0, total = torch.cuda.mem_get_info()
    runner = ModelRunner(
        loaded,
        device="cuda",
        dtype=torch.bfloat16,
        max_num_seqs=16,
        max_model_len=2048,
        gpu_memory_utilization=0.5,
        enforce_eager=True,
    )
    used = total - torch.cuda.mem_get_info()[0]
    kv = runner.num_blocks * runner.block_bytes()
    assert kv > 2**30  # gigabytes of KV on any GPU this test runs on
    assert used <= 0.55 * total, f"used {used / 2**30:.1f} GiB of {total / 2**30:.1f}"
    batch = ScheduledBatch([SeqChunk(0, [1, 2, 3], 0, [runner.num_blocks - 1], -1, True)])
    assert runner.execute(batch).shape == (1, loaded.config.vocab_size)
    del free0


def _cold_lora_kernels() -> None:
    """Forget what earlier tests in this process compiled of the LoRA kernels (the modules:
    engine.kernels re-exports functions of the same names)."""
    import importlib

    S = importlib.import_module("loraplex.engine.kernels.lora_shrink")
    E = importlib.import_module("loraplex.engine.kernels.lora_expand")
    for fn in (S._bgmv_shrink_kernel, S._sgmv_shrink_kernel):
        fn.device_caches.clear()
    for fn in (E._bgmv_expand_kernel, E._sgmv_expand_kernel):
        fn.device_caches.clear()


@contextmanager
def _lora_compiles() -> Iterator[list[str]]:
    """The LoRA kernels Triton compiles inside the block (compiled as usual)."""
    import triton

    compiled: list[str] = []

    def hook(*, fn, **_kw):
        compiled.append(fn.name)
        return False

    old = triton.knobs.runtime.jit_cache_hook
    triton.knobs.runtime.jit_cache_hook = hook
    lora: list[str] = []
    try:
        yield lora
        torch.cuda.synchronize()
    finally:
        triton.knobs.runtime.jit_cache_hook = old
        lora.extend(n for n in compiled if "shrink" in n or "expand" in n)


def test_lora_kernels_compiled_before_the_first_adapter_step(tiny):
    # the runner's warm-up forwards compile the in-line LoRA kernels; with the token count
    # not specialized on, no later prefill size or adapter mix compiles one again (a compile
    # stalls every request of that step for a second or more)
    _cold_lora_kernels()
    base, _, adapters = tiny
    runner = ModelRunner(
        str(base), device="cuda", dtype=torch.bfloat16, max_num_seqs=8, max_model_len=128,
        max_loras=4, gpu_memory_utilization=0.3, enforce_eager=True,
    )  # fmt: skip
    for slot, path in enumerate(adapters):
        runner.write_slot(slot, runner.read_adapter(path))
    with _lora_compiles() as lora:
        g = torch.Generator().manual_seed(2)
        steps = [([37], [0]), ([1, 1, 1], [0, 1, 2]), ([48, 3], [1, -1]), ([5], [2])]
        steps += [([20] * 5, [0, 1, 2, 0, -1])]
        for lens, slots in steps:
            chunks = [
                SeqChunk(i, torch.randint(3, 300, (n,), generator=g).tolist(), 0,
                         list(range(i * 8, i * 8 + 8)), s, True)
                for i, (n, s) in enumerate(zip(lens, slots, strict=True))
            ]  # fmt: skip
            runner.execute(ScheduledBatch(chunks))
            for step in range(2):  # decode steps (eager: the runner has no graphs)
                dec = [
                    SeqChunk(c.seq_id, [5], len(c.token_ids) + step, c.block_table,
                             c.adapter_slot, True)
                    for c in chunks
                ]  # fmt: skip
                runner.execute(ScheduledBatch(dec))
    assert not lora, f"compiled after start-up: {lora}"


def test_in_line_token_path_compiled_for_every_tile_config(tmp_path):
    # a model wide enough that the in-line per-token expand changes its tiles per program with
    # the token count (llama3-1b: gate_up 2 x 8192 columns, one 512-column tile per program
    # up to 16 tokens, two up to 33, eight 256-column tiles up to 66): the runner's warm-up
    # compiles every config, so prefills of 5, 20, 40 and 60 one-token sequences on 32
    # adapters (the per-token path, in line) compile nothing
    import importlib.util
    from pathlib import Path

    from loraplex.engine.kernels.lora_expand import token_path_sizes

    _cold_lora_kernels()
    runner = ModelRunner(
        "dummy:llama3-1b", device="cuda", dtype=torch.bfloat16, max_num_seqs=64,
        max_model_len=64, max_loras=32, max_lora_rank=16, gpu_memory_utilization=0.4,
        enforce_eager=True,
    )  # fmt: skip
    cfg = runner.config
    sizes = token_path_sizes(16, [cfg.intermediate_size] * 2, torch.device("cuda"), 63)
    assert len(sizes) >= 3, sizes  # the steps below reach several configs
    spec = importlib.util.spec_from_file_location(
        "bench_common", Path(__file__).resolve().parents[2] / "benchmarks" / "common.py"
    )
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    weights = runner.read_adapter(common.write_peft_adapter(tmp_path / "a", cfg, 16))
    for slot in range(32):
        runner.write_slot(slot, weights)
    with _lora_compiles() as lora:
        for n in (5, 20, 40, 60):
            chunks = [SeqChunk(i, [7], 0, [i], i % 32, True) for i in range(n)]
            runner.execute(ScheduledBatch(chunks))
    assert not lora, f"compiled after start-up: {lora}"


def test_async_scheduling_matches_synchronous_steps_on_graphs(tiny):
    """With async scheduling each decode graph reads the previous step's sampled ids on the
    device (placeholders on the host); the greedy tokens, with adapters, several prompt
    lengths and a batch that shrinks as requests finish, equal those of synchronous steps."""
    from loraplex.engine.api import AdapterRef, Request, SamplingParams
    from loraplex.engine.config import EngineConfig
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.offline import OfflineEngine

    base, _, adapters = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 21, 9, 33, 17)]
    tokens: dict[bool, dict[str, list[int]]] = {}
    for mode in (False, True):
        config = EngineConfig(
            device="cuda", dtype="float32", max_num_seqs=8, max_model_len=128, max_loras=4,
            num_gpu_blocks=128, async_scheduling=mode,
        )  # fmt: skip
        engine = OfflineEngine(LLMEngine.from_model(str(base), config))
        assert engine.core.runner.graphs is not None
        for i, p in enumerate(prompts):
            ref = None if i == 0 else AdapterRef(f"a{i % 3}", str(adapters[i % 3]))
            sp = SamplingParams(max_tokens=6 + 3 * i, temperature=0.0, ignore_eos=True)
            engine.add_request(Request(f"r{i}", p, sp, ref))
        got: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for o in engine.step():
                for d in o.deltas:
                    got.setdefault(o.request_id, []).extend(d.token_ids)
        engine.shutdown()
        tokens[mode] = got
        assert all(len(got[f"r{i}"]) == 6 + 3 * i for i in range(len(prompts)))
    assert tokens[True] == tokens[False]


def test_warm_up_tunes_the_decode_lora_once_per_gpu_model(tiny, tmp_path):
    """With a kernel-config directory the warm-up times the decode graphs' LoRA launch
    configs (every bucket from 16 rows, each path it captures) and saves them; a second
    runner on the same GPU model reads them instead of timing again; and the graphs it
    captures with the tuned entries decode as the rules' graphs do."""
    base, _, adapters = tiny
    loaded = load_model(str(base), dtype=torch.bfloat16, device="cuda")
    kw = dict(max_num_seqs=32, max_loras=40, num_blocks=256)
    cache = tmp_path / "kernel-configs"
    tuned = _runner(loaded, eager=False, kernel_config_dir=cache, **kw)
    want = {
        tuned.model.lora_tune_key(bs, path, 64) for bs in (16, 32) for path in ("segment", "token")
    }
    assert set(tuned.tuning_report) == want
    for key, times in tuned.tuning_report.items():
        assert "{}" in times and len(times) > 1, key  # the rules and at least one candidate
    assert tuned.launch_configs.path is not None and tuned.launch_configs.path.is_file()
    assert set(tuned.launch_configs.table["lora_decode"]) == want
    assert tuned.lora.ranks_used(set(range(32))) == {}  # the tuning adapters are gone
    again = _runner(loaded, eager=False, kernel_config_dir=cache, **kw)
    assert not again.tuning_report
    rules = _runner(loaded, eager=False, **kw)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in range(5, 29)]
    outs = []
    for r in (again, rules):
        for slot, path in enumerate(adapters):
            r.write_slot(slot, r.read_adapter(path))
        # 24 sequences (the bucket of 32): over 3 adapters the segment graph, then the base
        seqs = [Seq(p, i % 4 - 1, [7, 8, 9]) for i, p in enumerate(prompts)]
        outs.append(runner_logits(r, seqs, 3))
    for a, b in zip(*outs, strict=True):
        assert rel_err(a, b) < 3e-2
