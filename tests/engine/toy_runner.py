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
    prompt: list[int], weights: int, max_tokens: int, vocab: int, eos: int | None = None
) -> list[int]:
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        tok = int(toy_logits([(t, weights) for t in tokens], vocab).argmax())
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
    ):
        """``num_pages``: GPU pages in all (one group, one page per chunk); an adapter of toy
        weights ``w`` takes ``1 + w % 3`` of them. None: room for every slot at 3 pages."""
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_window = self.kv_local_groups = 0
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
            for j, t in enumerate(c.token_ids):
                t = filled.get(offset + j, t)
                if t < 0:
                    raise RuntimeError(f"seq {c.seq_id}: an unfilled placeholder")
                pos = c.start_pos + j
                self.pool[c.block_table[pos // bs]][pos % bs] = (t, w)
            offset += len(c.token_ids)
        pooled = []
        for c in batch.chunks:  # read after every write, as a layer's attention does
            if c.sample or c.pool:
                end = c.start_pos + len(c.token_ids)
                ctx = [self.pool[c.block_table[p // bs]][p % bs] for p in range(end)]
                if any(x is None for x in ctx):
                    raise RuntimeError("read an unwritten KV slot")
                if c.sample:
                    rows.append(toy_logits(ctx, self.vocab_size))  # type: ignore[arg-type]
                else:
                    pooled.append(toy_embedding(ctx, self.config.hidden_size))  # type: ignore[arg-type]
        logits = torch.stack(rows) if rows else torch.empty(0, self.vocab_size)
        return StepTensors(logits, torch.stack(pooled) if pooled else None)

    def execute(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None):
        return self.run(batch, prev_tokens).logits
