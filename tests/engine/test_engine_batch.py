"""End to end on CPU: one batch over many adapters == HF transformers + PEFT per request.

Each request's greedy tokens from one mixed batch (5 adapters and the base model) must
equal those of HF + PEFT running that request alone; also with preemption forced by a
tiny KV pool, with a prefix-cache hit, and with chunked prefill (small token budget).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest
import torch

from loraplex.engine.api import AdapterRef, EngineOutput, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine

MAX_TOKENS = 8
GREEDY = dict(temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS)


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


class HFReference:
    """HF + PEFT with every adapter loaded; one request at a time, memoized."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]) -> None:
        from peft import PeftModel
        from transformers import LlamaForCausalLM

        base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        names = list(adapters)
        self.model = PeftModel.from_pretrained(
            base, adapters[names[0]], adapter_name=names[0]
        ).eval()
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self._memo: dict[tuple[str | None, tuple[int, ...]], list[int]] = {}

    def greedy(
        self, adapter: str | None, prompt: list[int], max_tokens: int = MAX_TOKENS
    ) -> list[int]:
        key = (adapter, tuple(prompt))
        if key not in self._memo:
            if adapter is None:
                with self.model.disable_adapter():
                    self._memo[key] = hf_greedy(self.model, prompt, max_tokens)
            else:
                self.model.set_adapter(adapter)
                self._memo[key] = hf_greedy(self.model, prompt, max_tokens)
        return self._memo[key]


@pytest.fixture(scope="module")
def hf(tiny_model, tiny_adapters) -> HFReference:
    return HFReference(tiny_model, tiny_adapters)


@pytest.fixture
def make_engine(tiny_model):
    engines: list[LLMEngine] = []

    def make(**overrides) -> LLMEngine:
        cfg = dict(
            block_size=4,
            max_loras=6,
            max_lora_rank=16,
            device="cpu",
            dtype="float32",
            num_gpu_blocks=256,
        )
        cfg.update(overrides)
        engine = LLMEngine.from_model(tiny_model, EngineConfig(**cfg))
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        assert e.blocks.is_whole(), "KV pool leaked blocks"
        assert e.slots.is_idle(), "a LoRA slot is still pinned"
        e.shutdown()


def ref_for(adapters: dict[str, Path], name: str | None) -> AdapterRef | None:
    if name is None:
        return None
    path = adapters[name]
    return AdapterRef(f"{name}@v1", str(path))


def mixed_requests(adapters: dict[str, Path], n: int = 12) -> list[tuple[Request, str | None]]:
    rng = random.Random(0)
    names: list[str | None] = [*adapters, None]
    out = []
    for i in range(n):
        name = names[i % len(names)]
        prompt = [rng.randrange(3, 400) for _ in range(rng.randrange(3, 28))]
        out.append(
            (Request(f"r{i}", prompt, SamplingParams(**GREEDY), ref_for(adapters, name)), name)
        )
    return out


def run_all(engine: LLMEngine) -> dict[str, list[EngineOutput]]:
    outs: dict[str, list[EngineOutput]] = {}
    for _ in range(5000):
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        if not engine.has_unfinished():
            return outs
        if not engine.last_step_ran:
            time.sleep(0.002)  # adapter loads run in worker threads
    raise AssertionError("engine did not finish")


def tokens_of(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for d in o.choices for t in d.token_ids]


def check(engine: LLMEngine, hf: HFReference, reqs: list[tuple[Request, str | None]]) -> dict:
    for req, _ in reqs:
        engine.add_request(req)
    outs = run_all(engine)
    for req, name in reqs:
        assert isinstance(req.prompt, list)
        got = tokens_of(outs[req.request_id])
        assert got == hf.greedy(name, req.prompt), f"{req.request_id} ({name})"
    return outs


def test_adapters_change_the_greedy_tokens(hf, tiny_adapters):
    prompt = [5, 17, 42, 99, 123, 7]
    base = hf.greedy(None, prompt)
    outputs = {name: tuple(hf.greedy(name, prompt)) for name in tiny_adapters}
    assert all(list(t) != base for t in outputs.values())
    assert len(set(outputs.values())) == len(outputs)


def record_batches(engine: LLMEngine) -> list[tuple[int, int]]:
    """(sequences, distinct adapter slots) of every batch the runner executes."""
    seen: list[tuple[int, int]] = []
    run = engine.runner.run

    def recording(batch, prev_tokens=None):
        seen.append((len(batch.chunks), len({c.adapter_slot for c in batch.chunks})))
        return run(batch, prev_tokens)

    engine.runner.run = recording  # type: ignore[method-assign]
    return seen


def warm(engine: LLMEngine, reqs: list[tuple[Request, str | None]]) -> None:
    """Load every adapter first, so the batch under test is not shaped by load timing."""
    refs = {r.adapter.key: r.adapter for r, _ in reqs if r.adapter is not None}
    for key, ref in refs.items():
        engine.add_request(Request(f"warm-{key}", [3], SamplingParams(max_tokens=1), ref))
    run_all(engine)


def test_one_batch_matches_hf_per_request(make_engine, hf, tiny_adapters):
    engine = make_engine()
    reqs = mixed_requests(tiny_adapters)
    warm(engine, reqs)
    batches = record_batches(engine)
    check(engine, hf, reqs)
    assert batches[0] == (12, 6)  # every request, 5 adapters + base, in the first step
    assert engine.stats().adapter_loads == 5 and engine.stats().adapter_hits == 12 - 2


def test_with_preemption(make_engine, hf, tiny_adapters):
    engine = make_engine(num_gpu_blocks=24, max_loras=3)
    check(engine, hf, mixed_requests(tiny_adapters))
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.adapter_evictions > 0


def test_with_chunked_prefill(make_engine, hf, tiny_adapters):
    engine = make_engine(max_num_batched_tokens=8)
    check(engine, hf, mixed_requests(tiny_adapters))


def test_with_prefix_cache_hit(make_engine, hf, tiny_adapters):
    engine = make_engine()
    rng = random.Random(1)
    shared = [rng.randrange(3, 400) for _ in range(21)]
    first = [
        (Request("p0", shared, SamplingParams(**GREEDY), ref_for(tiny_adapters, "b-all")), "b-all")
    ]
    check(engine, hf, first)
    second = [
        (
            Request(
                "p1", [*shared, 11, 12], SamplingParams(**GREEDY), ref_for(tiny_adapters, "b-all")
            ),
            "b-all",
        ),
        (
            Request("p2", [*shared, 13], SamplingParams(**GREEDY), ref_for(tiny_adapters, "a-qv")),
            "a-qv",
        ),
        (Request("p3", shared, SamplingParams(**GREEDY)), None),
    ]
    outs = check(engine, hf, second)
    assert outs["p1"][-1].cached_tokens == 20  # 5 full blocks of 4
    assert outs["p2"][-1].cached_tokens == 0 and outs["p3"][-1].cached_tokens == 0  # other adapters


def test_bad_adapter_fails_alone(make_engine, hf, tiny_adapters, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_adapters["a-qv"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    bad = AdapterRef("broken@v1", str(broken))
    engine = make_engine()
    engine.add_request(Request("bad", [5, 6, 7], SamplingParams(**GREEDY), bad))
    outs = check(engine, hf, mixed_requests(tiny_adapters, n=4))
    bad = outs["bad"][-1]
    assert bad.finished and bad.error is not None and "broken@v1" in bad.error.message


def test_load_storm_through_few_pages(make_engine, tiny_adapters):
    # 60 distinct adapter keys (the five adapters under twelve names each) through GPU memory
    # that holds about three of the largest: every request's tokens equal those of a run with
    # room for all, no write lands on a page a running request reads, and every page comes
    # back once the adapters are unloaded
    from loraplex.engine.lora.pool import page_bytes

    names = list(tiny_adapters)
    rng = random.Random(3)
    reqs = []
    for i in range(72):
        name = names[i % len(names)]
        key = f"{name}#{i % 60}"
        prompt = [rng.randrange(3, 400) for _ in range(rng.randrange(3, 20))]
        reqs.append((key, Request(f"s{i}", prompt, SamplingParams(**GREEDY),
                                  AdapterRef(key, str(tiny_adapters[name])))))  # fmt: skip

    def run(engine: LLMEngine) -> dict[str, list[int]]:
        for _, req in reqs:
            engine.add_request(req)
        return {rid: tokens_of(o) for rid, o in run_all(engine).items()}

    roomy = make_engine(max_loras=None, max_cpu_loras=64, lora_memory_bytes=64 * 2**20)
    want = run(roomy)
    assert roomy.stats().adapter_evictions == 0

    full = sum(page_bytes(roomy.runner.config, 4).values()) * 2  # an adapter of rank 16
    tight = make_engine(max_loras=None, max_cpu_loras=64, lora_memory_bytes=3 * full)
    slots, write = tight.slots, tight.runner.write_slot
    writes = []

    def checked_write(slot, weights, pages):
        held = {
            off: s
            for s in range(slots.num_slots)
            if s != slot and slots.is_pinned(s)
            for offs in slots.pages_of(s).values()
            for off in offs
        }
        assert not {off for offs in pages.values() for off in offs} & set(held)
        writes.append(slot)
        return write(slot, weights, pages)

    tight.runner.write_slot = checked_write  # type: ignore[method-assign]
    assert run(tight) == want
    assert tight.stats().adapter_evictions > 0 and len(writes) >= 60
    for key in {k for k, _ in reqs}:
        tight.unload_adapter(key)
    assert slots.pages.pages_used() == 0 and not slots.resident


def test_steps_count_distinct_adapters_and_their_bytes(make_engine, tiny_adapters):
    # every step of one batch of a-qv (rank 8 on q, v), b-all twice (rank 16 on all seven)
    # and the base model reads both adapters once: 2 a step, and their A and B bytes of
    # every layer (float32; ranks are multiples of a page's 8 rows, so their pages hold
    # exactly these bytes); a base-only batch reads none
    from loraplex.engine.lora.weights import module_dims

    engine = make_engine()
    cfg = engine.runner.config
    dims = module_dims(cfg)

    def own_bytes(rank: int, targets: list[str]) -> int:
        return sum(rank * sum(dims[m]) for m in targets) * cfg.num_layers * 4

    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    want = own_bytes(8, ["q_proj", "v_proj"]) + own_bytes(16, all7)
    assert want == (8 * 2 * (128 + 96) + 16 * 2 * (128 + 96 + 96 + 128 + 3 * 192)) * 4
    names = ["a-qv", "b-all", "b-all", None]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS)
    reqs = [
        (Request(f"m{i}", [5 + i, 9, 11], params, ref_for(tiny_adapters, n)), n)
        for i, n in enumerate(names)
    ]
    warm(engine, reqs)
    batches = record_batches(engine)
    before = engine.stats()
    for req, _ in reqs:
        engine.add_request(req)
    run_all(engine)
    after = engine.stats()
    steps = after.steps - before.steps
    assert steps == MAX_TOKENS and set(batches) == {(4, 3)}
    assert after.lora_step_adapters - before.lora_step_adapters == 2 * steps
    assert after.lora_step_bytes - before.lora_step_bytes == want * steps

    for i in range(3):
        engine.add_request(Request(f"base{i}", [7 + i, 9, 11], params))
    run_all(engine)
    base = engine.stats()
    assert base.steps - after.steps == MAX_TOKENS
    assert (base.lora_step_adapters, base.lora_step_bytes) == (
        after.lora_step_adapters,
        after.lora_step_bytes,
    )
