"""LLMEngine over the paged toy runner: batching, preemption, prefix cache, adapters, errors.

The toy runner's logits depend on the context read back from its paged pool, so every
request's greedy tokens must equal :func:`reference_greedy` run on it alone.
"""

from __future__ import annotations

import threading

import pytest
from toy_runner import ToyRunner, reference_greedy, write_toy_adapter

from loraplex.engine.api import AdapterRef, Request, RequestOutput, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.errors import (
    AdapterIncompatible,
    AdapterLoadError,
    InvalidRequest,
    PromptTooLong,
)
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.offline import OfflineEngine

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tiny_tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("toytok"))


@pytest.fixture(params=["async", "sync"])
def make_engine(tok, request):
    """Engines over the toy runner; every test runs with async scheduling (step n+1 launched
    before step n's tokens are read, placeholders filled on the "device") and without."""
    engines: list[OfflineEngine] = []

    def make(num_blocks=64, block_size=4, slots=4, window=0, groups=0, **cfg) -> OfflineEngine:
        runner = ToyRunner(
            tok, num_blocks=num_blocks, block_size=block_size, num_slots=slots,
            kv_window=window, local_groups=groups,
        )  # fmt: skip
        cfg.setdefault("async_scheduling", request.param == "async")
        cfg.setdefault("max_cpu_loras", max(slots, 4))
        config = EngineConfig(block_size=block_size, max_loras=slots, **cfg)
        engine = OfflineEngine(LLMEngine(runner, config))
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        assert e.core.blocks.is_whole(), "KV pool leaked blocks"
        assert e.core.slots.is_idle(), "a LoRA slot is still pinned"
        e.shutdown()


def adapter(tmp_path, name: str, weights: int) -> AdapterRef:
    path = write_toy_adapter(tmp_path / name, weights)
    return AdapterRef(f"{name}@{weights}", str(path))


def run_all(engine: OfflineEngine, max_steps: int = 2000) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        if not engine.has_unfinished():
            return outs
        if not engine.last_step_ran:
            threading.Event().wait(0.002)  # adapter loads run in worker threads
    raise AssertionError("engine did not finish")


def tokens_of(outs: list[RequestOutput], index: int = 0) -> list[int]:
    return [t for o in outs for d in o.deltas if d.index == index for t in d.token_ids]


def finish_of(outs: list[RequestOutput], index: int = 0) -> str | None:
    reasons = [
        d.finish_reason for o in outs for d in o.deltas if d.index == index and d.finish_reason
    ]
    return reasons[-1] if reasons else None


def mixed_requests(tmp_path, n=10, max_tokens=12) -> list[tuple[Request, int]]:
    refs = [adapter(tmp_path, f"ad{i}", 10 + i) for i in range(5)]
    reqs = []
    for i in range(n):
        ref = None if i % 6 == 5 else refs[i % 5]
        prompt = [(7 * i + j) % 300 + 3 for j in range(5 + 3 * i)]
        weights = 0 if ref is None else 10 + (i % 5)
        reqs.append(
            (
                Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), ref),
                weights,
            )
        )
    return reqs


def check_against_reference(engine, reqs, tok):
    for req, _ in reqs:
        engine.add_request(req)
    outs = run_all(engine)
    for req, w in reqs:
        want = reference_greedy(req.prompt, w, req.sampling.max_tokens, len(tok))
        assert tokens_of(outs[req.request_id]) == want, req.request_id
        assert finish_of(outs[req.request_id]) == "length"
        assert outs[req.request_id][-1].finished
    return outs


def warm(engine: LLMEngine, reqs) -> None:
    """Load every adapter first, so the batch under test is not shaped by load timing."""
    refs = {r.adapter.key: r.adapter for r, _ in reqs if r.adapter is not None}
    for key, ref in refs.items():
        engine.add_request(Request(f"warm-{key}", [3], SamplingParams(max_tokens=1), ref))
    run_all(engine)


def test_batch_over_adapters_matches_reference(make_engine, tmp_path, tok):
    engine = make_engine(slots=6)
    reqs = mixed_requests(tmp_path)
    warm(engine, reqs)
    check_against_reference(engine, reqs, tok)
    assert max(len(b.chunks) for b in engine.core.runner.batches) == 10  # all in one batch
    assert engine.stats().adapter_loads == 5 and engine.stats().adapter_hits == 10 - 1


def test_preemption_keeps_results(make_engine, tmp_path, tok):
    engine = make_engine(num_blocks=16)
    check_against_reference(engine, mixed_requests(tmp_path), tok)
    assert engine.stats().preemptions > 0


def test_chunked_prefill_keeps_results(make_engine, tmp_path, tok):
    engine = make_engine(max_num_batched_tokens=7)
    check_against_reference(engine, mixed_requests(tmp_path), tok)
    assert any(not c.sample for b in engine.core.runner.batches for c in b.chunks)


def test_slot_pressure_keeps_results(make_engine, tmp_path, tok):
    engine = make_engine(slots=2)
    check_against_reference(engine, mixed_requests(tmp_path), tok)
    assert engine.stats().adapter_evictions > 0


def test_prefix_cache_hit_keeps_results(make_engine, tmp_path, tok):
    engine = make_engine()
    ref = adapter(tmp_path, "p", 3)
    prompt = list(range(3, 40))
    first = [(Request("a", prompt, SamplingParams(max_tokens=4, **GREEDY), ref), 3)]
    check_against_reference(engine, first, tok)
    again = [
        (Request("b", [*prompt, 9, 9], SamplingParams(max_tokens=6, **GREEDY), ref), 3),
        (Request("c", prompt, SamplingParams(max_tokens=6, **GREEDY)), 0),  # base: no sharing
    ]
    outs = check_against_reference(engine, again, tok)
    assert outs["b"][-1].cached_tokens == 36 and outs["c"][-1].cached_tokens == 0


def test_abort_returns_blocks_and_reports(make_engine, tmp_path):
    engine = make_engine()
    engine.add_request(Request("x", list(range(3, 20)), SamplingParams(max_tokens=50, **GREEDY)))
    engine.add_request(Request("y", list(range(3, 9)), SamplingParams(max_tokens=3, **GREEDY)))
    engine.step()
    engine.step()
    assert engine.abort("x") and not engine.abort("nope")
    outs = run_all(engine)
    assert outs["x"][-1].finished and finish_of(outs["x"]) == "abort"
    assert finish_of(outs["y"]) == "length"


def test_bad_requests_are_refused_alone(make_engine, tmp_path, tok):
    engine = make_engine(max_model_len=64)
    with pytest.raises(PromptTooLong):
        engine.add_request(Request("long", list(range(3, 70)), SamplingParams(max_tokens=1)))
    with pytest.raises(PromptTooLong):
        engine.add_request(Request("long2", list(range(3, 60)), SamplingParams(max_tokens=10)))
    with pytest.raises(InvalidRequest):
        engine.add_request(Request("t", list(range(3, 6)), SamplingParams(temperature=5.0)))
    with pytest.raises(InvalidRequest):
        engine.add_request(Request("e", [], SamplingParams()))
    good = [(Request("ok", list(range(3, 9)), SamplingParams(max_tokens=5, **GREEDY)), 0)]
    check_against_reference(engine, good, tok)


def test_failed_adapter_fails_only_its_requests(make_engine, tmp_path, tok):
    engine = make_engine()
    missing = AdapterRef("missing@1", str(tmp_path / "nowhere"))
    incompatible = adapter(tmp_path, "neg", -1)
    engine.add_request(Request("m1", [5, 6, 7], SamplingParams(max_tokens=3), missing))
    engine.add_request(Request("m2", [5, 6, 8], SamplingParams(max_tokens=3), missing))
    engine.add_request(Request("i1", [5, 6, 7], SamplingParams(max_tokens=3), incompatible))
    good = mixed_requests(tmp_path, n=4, max_tokens=5)
    check_against_reference(engine, good, tok)  # runs the bad ones to completion too
    stats = engine.stats()
    assert (
        stats.adapter_load_failures == 2 and engine.core.runner.reads == 4 + 2
    )  # one load per key


def test_failed_adapter_outputs(make_engine, tmp_path):
    engine = make_engine()
    missing = AdapterRef("missing@1", str(tmp_path / "nowhere"))
    engine.add_request(Request("m", [5, 6, 7], SamplingParams(max_tokens=3), missing))
    incompatible = adapter(tmp_path, "neg", -1)
    engine.add_request(Request("i", [5, 6, 7], SamplingParams(max_tokens=3), incompatible))
    outs = run_all(engine)
    m, i = outs["m"], outs["i"]
    assert m[-1].finished and finish_of(m) == "error" and "missing@1" in (m[-1].error or "")
    assert isinstance(m[-1].exception, AdapterLoadError)
    assert isinstance(i[-1].exception, AdapterIncompatible) and i[-1].exception.param == "model"
    assert "negative" in (i[-1].error or "")


def test_one_load_for_concurrent_requests(make_engine, tmp_path):
    engine = make_engine()
    engine.core.runner.read_gate.clear()  # hold the load until all requests are in
    ref = adapter(tmp_path, "cold", 4)
    for i in range(5):
        engine.add_request(
            Request(f"c{i}", [3 + i, 4, 5], SamplingParams(max_tokens=2, **GREEDY), ref)
        )
    engine.add_request(Request("base", [3, 4, 5], SamplingParams(max_tokens=2, **GREEDY)))
    outs = {}
    for _ in range(3):  # the base request runs (and finishes) while the adapter loads
        for o in engine.step():
            outs[o.request_id] = o
    assert "base" in outs and outs["base"].finished
    assert not any(k.startswith("c") for k in outs)
    engine.core.runner.read_gate.set()
    run_all(engine)
    assert engine.core.runner.reads == 1 and engine.stats().adapter_loads == 1


def text_of(outs: list[RequestOutput], index: int = 0) -> str:
    return "".join(d.text for o in outs for d in o.deltas if d.index == index)


def test_n_choices_share_the_prompt(make_engine, tok):
    engine = make_engine()
    prompt = list(range(3, 30))
    engine.add_request(Request("g", prompt, SamplingParams(max_tokens=6, n=3, **GREEDY)))
    engine.add_request(
        Request("s", prompt, SamplingParams(max_tokens=6, n=4, temperature=1.0, seed=7))
    )
    outs = run_all(engine)
    want = reference_greedy(prompt, 0, 6, len(tok))
    assert [tokens_of(outs["g"], i) for i in range(3)] == [want] * 3
    sampled = [tuple(tokens_of(outs["s"], i)) for i in range(4)]
    assert len(set(sampled)) > 1 and all(len(t) == 6 for t in sampled)
    assert outs["s"][-1].completion_tokens == 24 and outs["g"][-1].finished
    # a sibling computed only the prompt tail, not the whole prompt
    sizes = [len(c.token_ids) for b in engine.core.runner.batches for c in b.chunks]
    assert sizes.count(27) <= 2


def test_seed_reproducible_whatever_the_batch(make_engine):
    prompt = list(range(3, 20))
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=1234)
    alone = make_engine()
    alone.add_request(Request("a", prompt, params))
    first = tokens_of(run_all(alone)["a"])
    crowd = make_engine()
    for i in range(5):
        crowd.add_request(
            Request(f"o{i}", [4 + i] * (3 + i), SamplingParams(max_tokens=9, temperature=1.0))
        )
    crowd.add_request(Request("a", prompt, params))
    assert tokens_of(run_all(crowd)["a"]) == first


def test_stop_token_and_eos(make_engine, tok):
    engine = make_engine()
    prompt = list(range(3, 15))
    want = reference_greedy(prompt, 0, 10, len(tok))
    stop_tok = want[4]
    cut = want.index(stop_tok)
    engine.add_request(
        Request(
            "st", prompt, SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop_tok,))
        )
    )
    outs = run_all(engine)["st"]
    assert tokens_of(outs) == want[: cut + 1] and finish_of(outs) == "stop"
    assert outs[-1].completion_tokens == cut + 1


def test_stop_string_truncates_text(make_engine, tok):
    engine = make_engine()
    prompt = list(range(3, 15))
    want = reference_greedy(prompt, 0, 12, len(tok))
    full = tok.decode(want)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    engine.add_request(Request("ss", prompt, SamplingParams(max_tokens=12, stop=(stop,), **GREEDY)))
    engine.add_request(Request("plain", prompt, SamplingParams(max_tokens=12, **GREEDY)))
    outs = run_all(engine)
    assert text_of(outs["ss"]) == full[: full.index(stop)] and finish_of(outs["ss"]) == "stop"
    assert text_of(outs["plain"]) == full


def test_logprobs_through_the_engine(make_engine, tok):
    engine = make_engine()
    engine.add_request(
        Request("lp", [3, 4, 5, 6], SamplingParams(max_tokens=3, logprobs=2, **GREEDY))
    )
    outs = run_all(engine)["lp"]
    lps = [lp for o in outs for d in o.deltas for lp in (d.logprobs or [])]
    assert len(lps) == 3
    for lp in lps:
        assert (
            lp.logprob <= 0 and len(lp.top) == 2 and lp.top[0][0] == lp.token_id
        )  # greedy = top-1
        assert lp.top[0][2] >= lp.top[1][2]


def test_seeded_sampling_survives_preemption(make_engine):
    prompt = list(range(3, 20))
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=99)
    alone = make_engine()
    alone.add_request(Request("a", prompt, params))
    first = tokens_of(run_all(alone)["a"])
    tight = make_engine(num_blocks=12)
    for i in range(4):
        tight.add_request(
            Request(f"o{i}", [5 + i] * 9, SamplingParams(max_tokens=10, temperature=1.0))
        )
    tight.add_request(Request("a", prompt, params))
    assert tokens_of(run_all(tight)["a"]) == first
    assert tight.stats().preemptions > 0


@pytest.mark.parametrize("seed", range(8))
def test_random_workload_with_aborts(make_engine, tmp_path, tok, seed):
    random_workload(make_engine, tmp_path, tok, seed)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "groups", [1, 2, 0], ids=["one-local-group", "two-local-groups", "all-local"]
)
def test_random_workload_with_sliding_windows(make_engine, tmp_path, tok, seed, groups):
    """The same with toy sliding-window layers (window 5, blocks of 4): local groups whose
    blocks behind the window go back to the shared pool, every query's window read back
    through their tables checked against the full table's, under preemption, forks, prefix
    hits and aborts; or every layer local, with windowed logits."""
    random_workload(make_engine, tmp_path, tok, seed, window=5, groups=groups)


def random_workload(make_engine, tmp_path, tok, seed: int, window: int = 0, groups: int = 0):
    import random

    rng = random.Random(seed)
    engine = make_engine(
        num_blocks=rng.choice([14, 24, 64]) * (1 + groups),
        slots=rng.choice([1, 2, 3]),
        max_num_batched_tokens=rng.choice([6, 16, 64]),
        max_num_seqs=rng.choice([2, 4, 16]),
        enable_prefix_caching=rng.random() < 0.7,
        window=window,
        groups=groups,
    )
    refs = [adapter(tmp_path, f"w{i}", 30 + i) for i in range(4)]
    expected: dict[str, list[int]] = {}
    aborted: set[str] = set()
    outs: dict[str, list[RequestOutput]] = {}
    live: list[str] = []
    for step in range(400):
        if step < 60 and rng.random() < 0.4:
            rid = f"q{step}"
            k = rng.randrange(5)
            prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(1, 20))]
            ref, w = (None, 0) if k == 4 else (refs[k], 30 + k)
            n = rng.choice([1, 1, 2, 3])
            engine.add_request(
                Request(
                    rid, prompt, SamplingParams(max_tokens=rng.randrange(1, 8), n=n, **GREEDY), ref
                )
            )
            expected[rid] = reference_greedy(
                prompt,
                w,
                engine.core._requests[rid].params.max_tokens,
                len(tok),
                window=window if window and not groups else 0,
            )
            live.append(rid)
        if live and rng.random() < 0.05:
            rid = live.pop(rng.randrange(len(live)))
            if engine.abort(rid):
                aborted.add(rid)
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        if not engine.last_step_ran:
            threading.Event().wait(0.002)
        if step > 60 and not engine.has_unfinished():
            break
    assert not engine.has_unfinished()
    for rid, want in expected.items():
        assert outs[rid][-1].finished and [o.finished for o in outs[rid]].count(True) == 1
        if rid in aborted:
            continue
        n = len({d.index for o in outs[rid] for d in o.deltas})
        for i in range(n):
            assert tokens_of(outs[rid], i) == want, (rid, i)


def test_async_steps_read_the_previous_samples_on_the_device(make_engine, tok, request):
    """Async scheduling launches each decode step before the host has read the tokens of
    the step before: the batch names them (gather) instead of carrying them, and the
    tokens still equal the reference. Synchronous steps never need to."""
    engine = make_engine()
    prompt = list(range(3, 12))
    engine.add_request(Request("a", prompt, SamplingParams(max_tokens=8, **GREEDY)))
    outs = run_all(engine)
    assert tokens_of(outs["a"]) == reference_greedy(prompt, 0, 8, len(tok))
    gathered = [len(b.gather) for b in engine.core.runner.batches]
    if "async" in request.node.callspec.id:
        assert gathered[1:] == [1] * 7  # every decode step after the prefill
    else:
        assert not any(gathered)


def test_penalties_run_steps_one_at_a_time(make_engine, tok):
    """A penalty request's sampling reads its tokens on the host: while one is in flight,
    steps run one at a time (no placeholders), and every request's tokens are those of a
    synchronous engine."""
    want = {}
    for mode in (False, True):
        engine = make_engine(async_scheduling=mode)
        p = SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.5)
        engine.add_request(Request("pen", [3, 4, 5, 3, 4], p))
        engine.add_request(Request("plain", [6, 7, 8], SamplingParams(max_tokens=6, **GREEDY)))
        outs = run_all(engine)
        got = {rid: tokens_of(o) for rid, o in outs.items()}
        want.setdefault("tokens", got)
        assert got == want["tokens"]
        assert not any(b.gather for b in engine.core.runner.batches)


def test_load_storm_through_few_slots(make_engine, tmp_path, tok):
    """Hundreds of distinct adapters through two GPU slots and a host tier of two: loads run
    while others compute, nothing deadlocks, nothing a running request uses is evicted (the
    toy runner raises on a slot it did not write), and every output equals its reference."""
    engine = make_engine(slots=2, max_cpu_loras=2, adapter_load_workers=3)
    refs = [adapter(tmp_path, f"s{i}", 1 + i % 97) for i in range(240)]
    reqs = []
    for i in range(300):  # some adapters twice, some requests without one
        ref = None if i % 11 == 0 else refs[(i * 7) % len(refs)]
        w = 0 if ref is None else 1 + ((i * 7) % len(refs)) % 97
        prompt = [(5 * i + j) % 300 + 3 for j in range(3 + i % 5)]
        reqs.append((Request(f"q{i}", prompt, SamplingParams(max_tokens=3, **GREEDY), ref), w))
    check_against_reference(engine, reqs, tok)
    stats = engine.stats()
    assert stats.adapter_evictions > 200 and stats.adapter_host_evictions > 200
    assert stats.adapters_host <= 2 and stats.adapter_load_failures == 0
    assert stats.adapter_loads_by_tier["disk"].count == stats.adapter_loads
