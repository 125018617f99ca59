"""What the scheduler hands the model runner each step: plain ints, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SeqChunk:
    """One sequence's share of a step.

    ``token_ids`` are the tokens whose KV this step computes (a prefill chunk, or the one
    newest token when decoding); ``start_pos`` is the position of ``token_ids[0]``. Tokens
    before ``start_pos`` already have KV in ``block_table`` (earlier chunks or a prefix
    cache hit). ``adapter_slot`` is the GPU LoRA slot (-1: base model). ``sample`` says
    whether the runner must return logits for the chunk's last token, ``pool`` whether it must
    return that token's final hidden state (the last chunk of an embedding request: an
    embedding chunk never samples). ``block_table`` is the
    sequence's own list (not a copy): valid while the runner builds this step's inputs, it
    grows with the next scheduling step. ``local_tables``: likewise the tables of a model's
    sliding-window layer groups (``WindowedBlocks``); empty: none, or derived from
    ``block_table`` (``build_host_inputs``: warm-up and test chunks). ``local_start``: the
    sequence's ``local_start`` (the local tables' entries before it are given back: zeros).
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    adapter_slot: int
    sample: bool
    pool: bool = False
    local_tables: list[list[int]] = field(default_factory=list)
    local_start: int = 0


@dataclass
class ScheduledBatch:
    chunks: list[SeqChunk]
    # Tokens not known on the host yet (sampled by the step still in flight, -1 in
    # ``token_ids``): (index of the token in the batch, row of the previous step's samples).
    # The runner reads them on the device, from what that step sampled.
    gather: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_decode(self) -> bool:
        return all(len(c.token_ids) == 1 and c.start_pos > 0 for c in self.chunks)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)
