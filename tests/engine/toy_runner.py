"""A model runner made of ints, with a real paged "KV" pool, for engine logic tests.

It honours the runner contract (``execute(batch) -> logits[n_sample, vocab]``): each
chunk writes ``(token, adapter weights)`` into the pool slots its block table names, and
a sampled chunk's logits are a pseudo-random function of the whole context *as read back
from the pool*. So any block-table, prefix-cache, preemption or slot bug changes the
tokens, and :func:`reference_greedy` (same function over the true context) says what
they must be. Adapter "weights" are an int read from ``toy_adapter.json``.
"""

from __future__ import annotations

import json
import threading
import zlib
from pathlib import Path

import torch

from loraplex.engine.batch import ScheduledBatch
from loraplex.engine.errors import AdapterIncompatible, AdapterLoadError
from loraplex.engine.lora.slots import PagePlan
from loraplex.engine.model.config import ModelConfig
from loraplex.engine.runner import StepTensors


def toy_logits(context: list[tuple[int, int]], vocab: int) -> torch.Tensor:
    seed = zlib.crc32(repr(context).encode())
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def toy_embedding(context: list[tuple[int, int]], hidden: int) -> torch.Tensor:
    """What the toy pools for an embedding request: a unit vector that is a pseudo-random
    function of the whole context (tokens and adapter weights) read back from the pool."""
    return torch.nn.functional.normalize(toy_logits(context, hidden), dim=0)


def reference_greedy(
    prompt: list[int],
    weights: int,
    max_tokens: int,
    vocab: int,
    eos: int | None = None,
    window: int = 0,
) -> list[int]:
    """``window``: every toy layer local (``ToyRunner(kv_window=..., local_groups=0)``): the
    logits are a function of the last ``window`` positions only."""
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        seen = tokens[-window:] if window else tokens
        tok = int(toy_logits([(t, weights) for t in seen], vocab).argmax())
        out.append(tok)
        tokens.append(tok)
        if tok == eos:
            break
    return out


def write_toy_adapter(path: Path, weights: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "toy_adapter.json").write_text(json.dumps({"weights": weights}))
    return path


class ToyRunner:
    def __init__(
        self,
        tokenizer,
        *,
        num_blocks=64,
        block_size=4,
        max_model_len=256,
        num_slots=4,
        eos=(1,),
        num_pages=None,
        kv_window=0,
        local_groups=0,
    ):
        """``num_pages``: GPU pages in all (one group, one page per chunk); an adapter of toy
        weights ``w`` takes ``1 + w % 3`` of them. None: room for every slot at 3 pages.

        ``kv_window`` with ``local_groups``: toy sliding-window layer groups beside the full
        one (``block_manager.WindowedBlocks``): each writes the chunk through its own table
        into the same pool, and every query position's window read back through each local
        table must equal the full table's (else RuntimeError); the logits stay the full
        context's. With no local groups every toy layer is local (``LocalBlocks``): the
        logits are the window's (``reference_greedy(window=...)``)."""
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_window, self.kv_local_groups = kv_window, local_groups
        self.max_model_len = max_model_len
        self.eos_token_ids = eos
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.config = ModelConfig(  # what model info reports; the toy has no real layers
            vocab_size=self.vocab_size,
            hidden_size=8,
            intermediate_size=16,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            head_dim=4,
            max_position_embeddings=max_model_len,
        )
        self.pool: list[list[tuple[int, int] | None]] = [
            [None] * block_size for _ in range(num_blocks)
        ]
        self.slot_weights: list[int | None] = [None] * num_slots
        pages = num_pages if num_pages is not None else 3 * num_slots
        self.lora_plan = PagePlan(num_slots, pages, 1, {"qkv": 1})
        self.batches: list[ScheduledBatch] = []
        self.reads = 0
        self.read_gate = threading.Event()
        self.read_gate.set()
        self._lock = threading.Lock()

    def read_adapter(self, path: Path) -> int:
        self.read_gate.wait(10)
        with self._lock:
            self.reads += 1
        f = Path(path) / "toy_adapter.json"
        if not f.exists():
            raise AdapterLoadError(f"no adapter at {path}")
        weights = json.loads(f.read_text())["weights"]
        if weights < 0:
            raise AdapterIncompatible("negative toy weights")
        return weights

    def adapter_pages(self, weights: int) -> dict[str, int]:
        return {"qkv": 1 + weights % 3}

    def write_slot(self, slot: int, weights: int, pages: dict[str, list[int]]) -> None:
        if len(pages["qkv"]) != 1 + weights % 3:
            raise RuntimeError(f"slot {slot}: {pages} for toy weights {weights}")
        self.slot_weights[slot] = weights

    def clear_slot(self, slot: int) -> None:
        self.slot_weights[slot] = None

    def check_alive(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None) -> StepTensors:
        self.batches.append(batch)
        bs = self.block_size
        rows = []
        filled = {}  # placeholders: the previous step's samples, as the device would read
        if batch.gather:
            if prev_tokens is None:
                raise RuntimeError("gather without the previous step's samples")
            filled = {dst: int(prev_tokens[src]) for dst, src in batch.gather}
        offset = 0
        for c in batch.chunks:
            w = 0 if c.adapter_slot < 0 else self.slot_weights[c.adapter_slot]
            if w is None:
                raise RuntimeError(f"slot {c.adapter_slot} used before it was written")
            if self.kv_local_groups and len(c.local_tables) != self.kv_local_groups:
                raise RuntimeError(f"seq {c.seq_id}: {len(c.local_tables)} local tables")
            for j, t in enumerate(c.token_ids):
                t = filled.get(offset + j, t)
                if t < 0:
                    raise RuntimeError(f"seq {c.seq_id}: an unfilled placeholder")
                pos = c.start_pos + j
                for table in (c.block_table, *c.local_tables):
                    self.pool[table[pos // bs]][pos % bs] = (t, w)
            offset += len(c.token_ids)
        pooled = []
        for c in batch.chunks:  # read after every write, as a layer's attention does
            if self.kv_window:
                self._check_windows(c)
            if c.sample or c.pool:
                end = c.start_pos + len(c.token_ids)
                all_local = self.kv_window and not self.kv_local_groups
                start = max(0, end - self.kv_window) if all_local else 0
                ctx = [self.pool[c.block_table[p // bs]][p % bs] for p in range(start, end)]
                if any(x is None for x in ctx):
                    raise RuntimeError("read an unwritten KV slot")
                if c.sample:
                    rows.append(toy_logits(ctx, self.vocab_size))  # type: ignore[arg-type]
                else:
                    pooled.append(toy_embedding(ctx, self.config.hidden_size))  # type: ignore[arg-type]
        logits = torch.stack(rows) if rows else torch.empty(0, self.vocab_size)
        return StepTensors(logits, torch.stack(pooled) if pooled else None)

    def _check_windows(self, c) -> None:
        """Each query of chunk ``c`` reads its window through every local table (the one
        table when every layer is local): what the full table holds there, never a block
        given back or reused."""
        bs, w = self.block_size, self.kv_window
        for q in range(c.start_pos, c.start_pos + len(c.token_ids)):
            for p in range(max(0, q - w + 1), q + 1):
                want = self.pool[c.block_table[p // bs]][p % bs]
                if want is None:
                    raise RuntimeError(f"seq {c.seq_id}: position {p} never written")
                for g, table in enumerate(c.local_tables):
                    got = self.pool[table[p // bs]][p % bs]
                    if got != want:
                        raise RuntimeError(f"seq {c.seq_id}: local group {g} at {p}: {got}")

    def execute(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None):
        return self.run(batch, prev_tokens).logits
