"""Paged KV blocks: ref counts, a free list, and a prefix cache. Ints only.

A block is cached under the hash chain of the full token blocks up to and including it,
rooted at the adapter key, so KV is never shared across adapters (or adapter versions).
A block is registered only once its KV has been computed (:meth:`commit`), so a prefix
hit never reads KV that a chunked prefill has not written yet. Freed blocks keep their
hash and can be revived by a later hit until they are handed out again (LRU order).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from loraplex.engine.sequence import Sequence


def _root_hash(adapter_key: str | None) -> bytes:
    tag = b"base" if adapter_key is None else b"lora:" + adapter_key.encode()
    return hashlib.blake2b(tag, digest_size=16).digest()


def _chain(prev: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    # -- queries -----------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def is_whole(self) -> bool:
        """Every block free and unreferenced: nothing leaked."""
        return len(self._free) == self.num_blocks and not any(self._ref)

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Chain hashes of the first ``num_blocks`` full blocks, memoized on the sequence."""
        hashes = seq.block_hashes
        prev = hashes[-1] if hashes else _root_hash(seq.adapter_key)
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            prev = _chain(prev, seq.token_ids[i * bs : (i + 1) * bs])
            hashes.append(prev)
        return hashes[:num_blocks]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for the longest computed prefix, always leaving one token to run."""
        if not self.enable_prefix_caching:
            return []
        blocks: list[int] = []
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_admit(self, seq: Sequence, budget: int) -> bool:
        """Whether a sequence without blocks can take its prefix hit plus a first chunk."""
        hit = self.match_prefix(seq)
        revived = sum(1 for b in hit if self._ref[b] == 0)
        cached = len(hit) * self.block_size
        need = self.blocks_for(cached + min(seq.num_tokens - cached, budget)) - len(hit)
        return need + revived <= len(self._free)

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= len(self._free)

    # -- changes -----------------------------------------------------------------------

    def admit(self, seq: Sequence) -> None:
        """Give a sequence without blocks its prefix-cache hit (maybe none)."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        blocks = self.match_prefix(seq)
        for b in blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
        seq.block_table = blocks
        seq.num_committed_blocks = len(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size
        seq.num_cached_tokens = min(seq.num_computed_tokens, seq.prompt_len)

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Add blocks so the next ``num_new_tokens`` of ``seq`` have somewhere to live."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > len(self._free):
            raise RuntimeError("out of KV blocks; call can_grow first")
        for _ in range(need):
            seq.block_table.append(self._take_free())

    def grow_if_fits(self, seq: Sequence, num_new_tokens: int) -> bool:
        """:meth:`grow` if :meth:`can_grow`; say which (one look at the sizes)."""
        need = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(
            seq.block_table
        )
        if need > len(self._free):
            return False
        if need > 0:
            take, table = self._take_free, seq.block_table
            for _ in range(need):
                table.append(take())
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the full blocks whose KV is now computed in the prefix cache (blocks
        that hold a token still to be sampled wait: their hash is not known yet)."""
        if not self.enable_prefix_caching:
            return
        known = len(seq.token_ids) - seq.num_pending
        full = min(seq.num_computed_tokens, known) // self.block_size
        start = seq.num_committed_blocks
        if full <= start:
            return
        hashes = self._hashes(seq, full)
        for i in range(start, full):
            h, block = hashes[i], seq.block_table[i]
            if h not in self._cached and self._hash[block] is None:
                self._cached[h] = block
                self._hash[block] = h
        seq.num_committed_blocks = full

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share the parent's full prompt blocks with a fresh child (leaves >= 1 token)."""
        if child.block_table:
            raise RuntimeError(f"sequence {child.seq_id} already holds blocks")
        shared = min(
            (child.num_tokens - 1) // self.block_size, parent.num_computed_tokens // self.block_size
        )
        blocks = parent.block_table[:shared]
        for b in blocks:
            self._ref[b] += 1
        child.block_table = list(blocks)
        child.num_committed_blocks = shared
        child.num_computed_tokens = shared * self.block_size
        child.num_cached_tokens = 0

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; tail blocks become the first to be reused."""
        for b in reversed(seq.block_table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
        seq.block_table = []
        seq.num_committed_blocks = 0
        seq.num_computed_tokens = 0

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._hash[block]
        if h is not None:
            if self._cached.get(h) == block:
                del self._cached[h]
            self._hash[block] = None
        self._ref[block] = 1
        return block
