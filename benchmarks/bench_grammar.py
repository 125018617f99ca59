"""Grammar engines for structured outputs, measured on the served model's tokenizer (CPU).

One command: ``PYTHONPATH=. python benchmarks/bench_grammar.py`` (``--engines xgrammar,llguidance``;
an engine that is not installed is skipped: ``pip install xgrammar llguidance``).
For each engine: the one-off tokenizer preparation, the compile time of each of
``--schemas`` generated JSON schemas (``benchmarks/json_schemas.py``: nested objects, arrays,
enums, unions) on a cold cache, and the time to fill one token mask while a random walk of
allowed tokens writes a valid value for each schema (one matcher at a time, then a batch of
``--batch`` matchers filled at once by the engine's own thread pool). The walk picks a
random allowed token, so it visits the states sampling would (string bodies, separators,
nested values). Each grammar is walked twice: ``mask_*`` is the first walk (states met for
the first time), ``warm_mask_*`` the second (new matchers of the same compiled grammars,
as requests of a cached schema get).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from json_schemas import schemas

MAX_WALK = 400


def _tokenizer(model: str | None) -> Any:
    from transformers import AutoTokenizer

    from loraplex.engine.model.loader import default_model_path

    path = Path(model) if model else default_model_path()
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _allowed(mask: torch.Tensor, vocab: int) -> list[int]:
    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].nonzero().flatten().tolist()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Any, vocab: int, threads: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(threads)

    def compile(self, schema: str) -> Any:
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m: Any, mask: torch.Tensor) -> None:
        m.fill_next_token_bitmask(mask, 0)

    def fill_batch(self, ms: list[Any], mask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(ms, mask)

    def accept(self, m: Any, t: int) -> bool:
        return m.accept_token(t)

    def done(self, m: Any) -> bool:
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Any, vocab: int, threads: int) -> None:
        import llguidance
        import llguidance.torch

        from loraplex.engine.structured import llg_tokenizer

        self.llg = llguidance
        self.lt = llguidance.torch
        # the engine's own construction (checked against the tokenizer's decode)
        self.tok = llg_tokenizer(tok, vocab, [tok.eos_token_id])
        self.executor = llguidance.LLExecutor(threads)

    def compile(self, schema: str) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False}
        )
        m = self.llg.LLMatcher(self.tok, grammar)
        if m.is_error():
            raise ValueError(m.get_error())
        return m  # the template: each request's matcher is a copy (as the engine does)

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, m: Any, mask: torch.Tensor) -> None:
        self.lt.fill_next_token_bitmask(m, mask, 0)

    def fill_batch(self, ms: list[Any], mask: torch.Tensor) -> None:
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], mask)

    def accept(self, m: Any, t: int) -> bool:
        return m.consume_token(t)

    def done(self, m: Any) -> bool:
        return m.is_stopped()


def measure(engine_cls: Any, tok: Any, texts: list[str], batch: int, threads: int) -> dict:
    vocab = len(tok)
    eos = {tok.eos_token_id}
    t0 = time.perf_counter()
    eng = engine_cls(tok, vocab, threads)
    prep_s = time.perf_counter() - t0
    compile_ms, compiled = [], []
    for s in texts:
        t0 = time.perf_counter()
        compiled.append(eng.compile(s))
        compile_ms.append((time.perf_counter() - t0) * 1000)
    words = (vocab + 31) // 32
    mask = torch.zeros((1, words), dtype=torch.int32)
    rng = random.Random(0)
    walks: list[list[float]] = []
    tokens, finished = 0, 0
    for _ in range(2):  # the first walk over each grammar meets its states for the first time
        fill_us: list[float] = []
        walks.append(fill_us)
        for c in compiled:
            m = eng.matcher(c)
            for _ in range(MAX_WALK):
                t0 = time.perf_counter()
                eng.fill(m, mask)
                fill_us.append((time.perf_counter() - t0) * 1e6)
                t = rng.choice(_allowed(mask[0], vocab))
                if not eng.accept(m, t):
                    raise RuntimeError(f"{eng.name} refused an allowed token {t}")
                tokens += 1
                if eng.done(m):
                    finished += 1
                    break
    # a batch: `batch` matchers over the schemas, each advanced a few tokens, filled at once
    ms = []
    big = torch.zeros((batch, words), dtype=torch.int32)
    for i in range(batch):
        m = eng.matcher(compiled[i % len(compiled)])
        for _ in range(rng.randint(0, 6)):
            eng.fill(m, mask)
            t = rng.choice(_allowed(mask[0], vocab))
            if t in eos:  # stay short of the end: the batch fills masks of live matchers
                break
            eng.accept(m, t)
        ms.append(m)
    batch_ms: list[float] = []
    for _ in range(20):
        t0 = time.perf_counter()
        eng.fill_batch(ms, big)
        batch_ms.append((time.perf_counter() - t0) * 1000)
    return {
        "engine": eng.name,
        "tokenizer_prep_s": round(prep_s, 3),
        "compile_ms_median": round(statistics.median(compile_ms), 2),
        "compile_ms_p90": round(_pct(compile_ms, 0.9), 2),
        "compile_ms_max": round(max(compile_ms), 2),
        "mask_us_median": round(statistics.median(walks[0]), 1),
        "mask_us_p99": round(_pct(walks[0], 0.99), 1),
        "mask_us_max": round(max(walks[0]), 1),
        "warm_mask_us_median": round(statistics.median(walks[1]), 1),
        "warm_mask_us_p99": round(_pct(walks[1], 0.99), 1),
        "warm_mask_us_max": round(max(walks[1]), 1),
        "walk_tokens": tokens,
        "walks_finished": finished,
        f"batch{batch}_fill_ms_median": round(statistics.median(batch_ms), 3),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: SmolLM2 GGUF)")
    p.add_argument("--engines", default="xgrammar,llguidance")
    p.add_argument("--schemas", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    tok = _tokenizer(a.model)
    texts = [json.dumps(s) for s in schemas(a.schemas, seed=1)]
    classes = {"xgrammar": XGrammar, "llguidance": LLGuidance}
    rows = []
    for name in a.engines.split(","):
        try:
            __import__(name)
        except ImportError:
            print(f"{name}: not installed, skipped")
            continue
        row = measure(classes[name], tok, texts, a.batch, a.threads)
        print(json.dumps(row))
        rows.append(row)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
