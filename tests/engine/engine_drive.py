"""Driving an ``LLMEngine`` to the end in tests, over the mixed workload the family, MoE and
tensor-parallel engine tests share: eight requests of the base and the adapters in turn, then
one whose prompt extends an earlier one's (a prefix hit when its blocks were not preempted
away). The adapters go into host memory before the measured run: loads run in loader
threads, and where one lands among the steps would otherwise depend on the machine's load
(a busy CI box saw runs without the preemption or the prefix hit the tests rely on)."""

from __future__ import annotations

import random
import time
from pathlib import Path

from model_builders import VOCAB

from loraplex.engine.api import AdapterRef, Request, SamplingParams
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.offline import run_requests


def mixed_requests(
    name: str,
    adapters: list[Path],
    which: list[int | None],
    greedy: dict,
    prefix_of: int,
) -> tuple[list[Request], dict[str, int | None]]:
    """Requests ``r0``..``r7`` (adapter ``which[i % len(which)]``, None: the base) and ``p``:
    ``r{prefix_of}``'s prompt and adapter, two tokens longer. -> (requests, adapter index
    by request id)."""
    rng = random.Random(0)
    reqs, names = [], {}
    for i in range(8):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 20))]
        a = which[i % len(which)]
        ref = None if a is None else AdapterRef(f"{name}-{a}@v1", str(adapters[a]))
        reqs.append(Request(f"r{i}", prompt, SamplingParams(**greedy), ref))
        names[f"r{i}"] = a
    first = reqs[prefix_of]
    reqs.append(Request("p", [*first.prompt, 7, 8], SamplingParams(**greedy), first.adapter))
    names["p"] = names[first.request_id]
    return reqs, names


def drive(engine: LLMEngine, reqs: list[Request], cached: dict[str, int]) -> dict[str, list[int]]:
    """Submit ``reqs`` and step until all end. -> each request's tokens (its choices' one
    after another, by index); ``cached`` gets each one's prefix-cache tokens."""
    for r in reqs:
        engine.add_request(r)
    got: dict[str, dict[int, list[int]]] = {r.request_id: {} for r in reqs}
    for _ in range(5000):
        for o in engine.step():
            assert o.error is None, o.error
            for c in o.choices:
                got[o.request_id].setdefault(c.index, []).extend(c.token_ids)
            cached[o.request_id] = o.cached_tokens
        if not engine.has_unfinished():
            return {r: [t for i in sorted(ch) for t in ch[i]] for r, ch in got.items()}
        if not engine.last_step_ran:
            time.sleep(0.002)  # adapter loads run in loader threads
    raise AssertionError("engine did not finish")


def drive_mixed(engine: LLMEngine, reqs: list[Request]) -> tuple[dict[str, list[int]], dict]:
    """The adapters of ``reqs`` into host memory one at a time (a one-token request each),
    then ``r*`` together, then ``p``. -> (tokens by request id, cached tokens by id)."""
    for ref in dict.fromkeys(r.adapter for r in reqs if r.adapter is not None):
        drive(
            engine, [Request(f"warm-{ref.key}", [5, 6, 7], SamplingParams(max_tokens=1), ref)], {}
        )
    cached: dict[str, int] = {}
    got = drive(engine, reqs[:-1], cached)
    got |= drive(engine, reqs[-1:], cached)
    return got, cached


def run_to_end(
    engine: LLMEngine, reqs: list[Request], in_flight: int | None = None
) -> tuple[dict[str, list[int]], dict[str, str], dict[str, str]]:
    """:func:`run_requests`, then shut the engine down."""
    try:
        return run_requests(engine, reqs, in_flight)
    finally:
        engine.shutdown()
