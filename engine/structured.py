"""Constrained decoding for structured outputs, with llguidance.

:class:`GrammarCache` compiles each distinct :class:`engine.api.Grammar` once, in worker
threads (llguidance drops the GIL while it builds a parser), and keeps the compiled
matcher as a template: a request's choices each get a ``deep_copy`` of it. The engine holds
a request back from the scheduler until its grammar is ready, so compilation is never on
the step loop's path; a grammar that cannot be compiled fails that request alone (400).

:class:`MaskBatch` is one step's token masks: after the step's forward is queued, the rows
of constrained requests have their allowed tokens computed into a pinned bitmask by
llguidance's thread pool (while the GPU runs the forward), copied to the device with one
transfer, and applied to those rows' logits in one batched op before sampling
(``engine.token_mask``). Unconstrained rows beside them are untouched. The end of
sequence token is allowed only where the grammar accepts what was written.

llguidance reads each token's bytes from the tokenizer's JSON, choosing byte-level BPE or
SentencePiece byte fallback from the decoder (:func:`llg_tokenizer`); the engine checks that
it reads what the tokenizer decodes before any grammar is compiled, since a misread
vocabulary makes masks that no valid output fits.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import torch

from loraplex.engine.api import Grammar
from loraplex.engine.devices import to_device
from loraplex.engine.errors import InvalidRequest
from loraplex.engine.grammar_spec import grammar_text
from loraplex.engine.token_mask import MaskBatch

log = logging.getLogger(__name__)
PARAM = "response_format"


class GrammarCache:
    """Compiled grammars by value (an LRU of ``capacity``), compiled in ``workers`` threads.

    The tokenizer's llguidance form is built once, in a worker: with the first grammar, or
    ahead of it with :meth:`prepare` (the engine server does; 2-3 s of CPU for SmolLM2's
    49k vocabulary on the dev box)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: frozenset[int],
        *,
        workers: int = 2,
        capacity: int = 512,
        mask_threads: int | None = None,
    ) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._compiled: OrderedDict[Grammar, Future[llguidance.LLMatcher]] = OrderedDict()
        self._capacity = capacity
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._mask_threads = mask_threads
        self._executor: llguidance.LLExecutor | None = None
        self.on_done: Callable[[], None] | None = None  # the step loop's wake-up
        self.compiles = 0
        self.hits = 0
        self.compile_ms = 0.0

    def get(self, grammar: Grammar) -> Future[llguidance.LLMatcher]:
        """The compiled template of ``grammar`` (a future; compiled once per value)."""
        with self._lock:
            fut = self._compiled.get(grammar)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._compiled.move_to_end(grammar)
                self.hits += 1
                return fut
            fut = self._pool.submit(self._compile, grammar)
            self._compiled[grammar] = fut
            while len(self._compiled) > self._capacity:
                self._compiled.popitem(last=False)
        fut.add_done_callback(self._notify)
        return fut

    def prepare(self) -> None:
        """Build the tokenizer's llguidance form now, in a worker (seconds for a large
        vocabulary), instead of with the first grammar."""
        self._pool.submit(self._llg_tokenizer)

    def _notify(self, _: Future) -> None:
        if self.on_done is not None:
            self.on_done()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = llg_tokenizer(self._hf_tokenizer, self.vocab_size, self._eos)
            return self._tokenizer

    def _compile(self, grammar: Grammar) -> llguidance.LLMatcher:
        tok = self._llg_tokenizer()
        t0 = time.perf_counter()
        try:
            text = grammar_text(grammar)
        except ValueError as exc:
            raise InvalidRequest(f"{PARAM}: {exc}", param=PARAM) from None
        matcher = llguidance.LLMatcher(tok, text, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(
                f"{PARAM}: the schema is not supported: {matcher.get_error()}", param=PARAM
            )
        self.compiles += 1
        self.compile_ms += (time.perf_counter() - t0) * 1000
        return matcher

    @property
    def executor(self) -> llguidance.LLExecutor:
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self._mask_threads)
        return self._executor

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# text whose tokens hold what a misread vocabulary gets wrong: spaces and newlines (byte-level
# BPE writes them as other characters), quotes, digits, non-ASCII letters and an emoji
PROBE = ' {"a b": [1, 2.5], "c": "x\ty"}\n  Ünïcode 中文 🙂 end\n'


def llg_tokenizer(hf_tokenizer: Any, vocab_size: int, eos: list[int]) -> llguidance.LLTokenizer:
    """llguidance's form of a fast HF tokenizer, checked against the tokenizer's own decode.

    llguidance takes a byte-level BPE (token strings in GPT-2's byte alphabet, ``Ġ`` a space)
    only when the decoder is ``ByteLevel`` itself; a ``Sequence`` holding ``ByteFallback``
    makes it read tokens as SentencePiece pieces, so ``Ġ`` stays the two bytes of that
    character and no token holds a space. transformers 5.17 builds exactly that decoder
    (``ByteFallback, Fuse, Replace, ByteLevel``) for a GPT-2-style GGUF vocabulary such as
    SmolLM2's: every JSON mask after ``{"key":`` was empty and the sampled token refused.
    A sequence that ends in ``ByteLevel`` decodes byte-level tokens, so llguidance is given
    that ``ByteLevel`` alone. Raises RuntimeError when llguidance still reads the probe text's
    tokens differently from the tokenizer (no grammar could be enforced)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RuntimeError("structured outputs need a fast (Rust-backed) tokenizer")
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    spec = json.loads(backend.to_str())
    decoder = spec.get("decoder") or {}
    parts = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else []
    if parts and parts[-1].get("type") == "ByteLevel":
        spec["decoder"] = parts[-1]
    tok = llguidance.LLTokenizer(json.dumps(spec), n_vocab=vocab_size, eos_token=eos)
    ids = list(hf_tokenizer.encode(PROBE, add_special_tokens=False))
    want = hf_tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    got = tok.decode_str(ids)
    if got.lstrip() != want.lstrip():  # (a SentencePiece decode drops one leading space)
        raise RuntimeError(
            f"llguidance reads this tokenizer's tokens as other text ({got!r}, the tokenizer "
            f"decodes {want!r}; decoder {json.dumps(decoder)[:200]}): its grammar masks would "
            "not fit valid outputs"
        )
    return tok


def fill_masks(
    cache: GrammarCache,
    matchers: list[tuple[int, llguidance.LLMatcher]],
    device: torch.device,
    extra: list[tuple[int, int]] = (),  # type: ignore[assignment]
) -> MaskBatch:
    """Each (logits row, matcher)'s allowed next tokens, filled in parallel on the host and
    sent to ``device`` in one copy; ``extra``: (line, token) also allowed (a thinking
    model's think-start token on its first step)."""
    words = (cache.vocab_size + 31) // 32
    host = torch.empty((len(matchers), words), dtype=torch.int32, pin_memory=device.type == "cuda")
    cache.executor.unsafe_compute_mask_ptr(
        [(m, i) for i, (_, m) in enumerate(matchers)], host.data_ptr(), words * 4, len(matchers)
    )
    for line, token in extra:
        if 0 <= token < words * 32:
            word = int(host[line, token // 32]) | (1 << (token % 32))
            host[line, token // 32] = word - (1 << 32) if word >= 1 << 31 else word
    return MaskBatch([row for row, _ in matchers], to_device(host, device))
