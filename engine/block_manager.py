"""Paged KV blocks: ref counts, a free list, and a prefix cache. Ints only.

A block is cached under the hash chain of the full token blocks up to and including it,
rooted at the adapter key, so KV is never shared across adapters (or adapter versions).
A block is registered only once its KV has been computed (:meth:`commit`), so a prefix
hit never reads KV that a chunked prefill has not written yet. Freed blocks keep their
hash and can be revived by a later hit until they are handed out again (LRU order).

:class:`WindowedBlocks`: a model with sliding-window (local) layers beside full ones
(Gemma 2/3) keeps a table per group of layers over the same pool: the full layers' blocks
(every block of a sequence) and the local layers' (only those a query can still see: the
blocks wholly behind the window of the next position go back as the sequence advances).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable

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

    def held(self, seq: Sequence) -> int:
        """The block ids ``seq`` holds (its share of the pool)."""
        return len(seq.block_table)

    def capacity_tokens(self, chunk: int) -> int:
        """The longest sequence the pool can hold alone (prefilled ``chunk`` tokens a step)."""
        return self.num_blocks * self.block_size

    def fits_held(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` fits the pool alone with every block held
        (none given back behind a window: ``Sequence.hold_local``)."""
        return self.blocks_for(num_tokens) <= self.num_blocks

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
        self._acquire(blocks)
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
        self._register(self._hashes(seq, full), seq.block_table, start, full)
        seq.num_committed_blocks = full

    def _register(self, hashes: list[bytes], table: list[int], start: int, end: int) -> None:
        """Offer ``table[start:end]`` (computed, full) to the prefix cache under ``hashes``."""
        for i in range(start, end):
            h, block = hashes[i], table[i]
            if h not in self._cached and self._hash[block] is None:
                self._cached[h] = block
                self._hash[block] = h

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
        self._release(reversed(seq.block_table))
        seq.block_table = []
        seq.num_committed_blocks = 0
        seq.num_computed_tokens = 0

    def _acquire(self, blocks: list[int]) -> None:
        """One more reference to each of ``blocks`` (a free one is revived: off the list)."""
        for b in blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def _release(self, blocks: Iterable[int]) -> None:
        """One reference less to each of ``blocks``; unreferenced ones go on the free list
        (keeping their hash: a later hit revives them until they are handed out again)."""
        ref, free = self._ref, self._free
        for b in blocks:
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._hash[block]
        if h is not None:
            if self._cached.get(h) == block:
                del self._cached[h]
            self._hash[block] = None
        self._ref[block] = 1
        return block


def _group_hash(h: bytes, group: int) -> bytes:
    """The prefix-cache key of a block's KV in local layer group ``group`` (its own namespace
    beside the full layers' key ``h``)."""
    return hashlib.blake2b(h + b"local" + bytes([group]), digest_size=16).digest()


def _longest_window_hit(
    k: int, first_live: Callable[[int], int], cached: Callable[[int], bool]
) -> int:
    """The longest prefix of at most ``k`` blocks whose last window of blocks (from
    ``first_live(blocks)``) is all ``cached``: a miss at block j leaves prefixes of at most
    j blocks (a block's chain hash names every token before it, so a cached block proves
    the prefix up to it)."""
    while k > 0:
        miss = next((j for j in range(k - 1, first_live(k) - 1, -1) if not cached(j)), None)
        if miss is None:
            return k
        k = miss
    return 0


class WindowedBlocks(BlockManager):
    """The KV blocks of a model whose local layers see the last ``window`` positions and
    whose other layers see all (Gemma 2 and 3), over one pool of block ids. The layers are
    cut into groups of as many layers as the full ones (``ModelRunner._kv_layout``: one full
    group, ``groups`` local ones, the last maybe partly empty), and each group's layers read
    their own table; a block id holds one group's KV, so memory goes to whichever kind needs
    it (vLLM's hybrid KV cache manager lays memory out the same way). ``seq.block_table`` is
    the full group's table; ``seq.local_tables`` the local groups', as long, whose entries
    before ``seq.local_start`` have been given back (0: the kernels never read a block
    outside the window, ``engine/kernels/paged_decode_attention.py``). A logical block thus
    costs one id for the full layers and ``groups`` ids for the local ones while a query can
    still read it.

    After each step (:meth:`commit`) the local blocks wholly behind the window of the next
    position go back to the pool, where they stay cached under their hash until they are
    handed out again; a sequence whose siblings fork off its prompt (``hold_local``) keeps
    them until they have. A prefix hit is as long as the full group's hit, cut to the
    longest prefix whose last window of local blocks is cached too.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        window: int,
        groups: int,
        enable_prefix_caching: bool,
    ) -> None:
        if window < 1 or groups < 1:
            raise ValueError("a windowed pool needs a window and a local layer group")
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.window = window
        self.groups = groups

    def first_live(self, pos: int) -> int:
        """The first block that a local layer's query at ``pos`` reads."""
        return max(0, pos - self.window + 1) // self.block_size

    def held(self, seq: Sequence) -> int:
        return len(seq.block_table) + self.groups * (
            len(seq.local_tables[0]) - seq.local_start if seq.local_tables else 0
        )

    def capacity_tokens(self, chunk: int) -> int:
        """The longest sequence the pool can hold alone, prefilled ``chunk`` tokens a step:
        a full block for every position, and in each local group at most a window, a block
        each side and a chunk (every block, for a sequence shorter than that)."""
        bs = self.block_size
        live = -(-self.window // bs) + 2 + -(-chunk // bs)
        n = self.num_blocks - self.groups * live
        if n < live:
            n = self.num_blocks // (1 + self.groups)
        return n * bs

    def fits_held(self, num_tokens: int) -> bool:
        return (1 + self.groups) * self.blocks_for(num_tokens) <= self.num_blocks

    def _hit(self, seq: Sequence) -> tuple[list[int], list[list[int]], int]:
        """-> (full blocks, each local group's blocks from the first live one, that block's
        index) of the longest prefix the pool holds for every group."""
        full = super().match_prefix(seq)
        hashes, cached, groups = seq.block_hashes, self._cached, range(self.groups)
        k = _longest_window_hit(
            len(full),
            lambda n: self.first_live(n * self.block_size),
            lambda j: all(_group_hash(hashes[j], g) in cached for g in groups),
        )
        lo = self.first_live(k * self.block_size) if k else 0
        local = [[cached[_group_hash(hashes[j], g)] for j in range(lo, k)] for g in groups]
        return full[:k], local, lo

    def match_prefix(self, seq: Sequence) -> list[int]:
        return self._hit(seq)[0]

    def can_admit(self, seq: Sequence, budget: int) -> bool:
        full, local, _ = self._hit(seq)
        cached = len(full) * self.block_size
        new = self.blocks_for(cached + min(seq.num_tokens - cached, budget)) - len(full)
        ref = self._ref
        revived = sum(1 for b in full if ref[b] == 0)
        revived += sum(1 for t in local for b in t if ref[b] == 0)
        return new * (1 + self.groups) + revived <= len(self._free)

    def _need(self, seq: Sequence, num_new_tokens: int) -> tuple[int, int]:
        """-> (new full blocks, new blocks per local group) for ``num_new_tokens`` more."""
        n = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        local = len(seq.local_tables[0]) if seq.local_tables else 0
        return n - len(seq.block_table), n - local

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        need, need_local = self._need(seq, num_new_tokens)
        return need + self.groups * need_local <= len(self._free)

    def admit(self, seq: Sequence) -> None:
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        full, local, lo = self._hit(seq)
        self._acquire(full)
        for t in local:
            self._acquire(t)
        seq.block_table = full
        seq.local_tables = [[0] * lo + t for t in local]
        seq.local_start = lo
        seq.num_committed_blocks = len(full)
        seq.num_computed_tokens = len(full) * self.block_size
        seq.num_cached_tokens = min(seq.num_computed_tokens, seq.prompt_len)

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        if not self.grow_if_fits(seq, num_new_tokens):
            raise RuntimeError("out of KV blocks; call can_grow first")

    def grow_if_fits(self, seq: Sequence, num_new_tokens: int) -> bool:
        need, need_local = self._need(seq, num_new_tokens)
        if need + self.groups * need_local > len(self._free):
            return False
        take, table = self._take_free, seq.block_table
        for _ in range(need):
            table.append(take())
        if need_local > 0:
            if not seq.local_tables:
                seq.local_tables = [[] for _ in range(self.groups)]
            for t in seq.local_tables:
                for _ in range(need_local):
                    t.append(take())
        return True

    def commit(self, seq: Sequence) -> None:
        """As :meth:`BlockManager.commit` for every group; then the local blocks behind the
        window of the next position go back (unless ``seq.hold_local``)."""
        start = seq.num_committed_blocks
        super().commit(seq)
        end = seq.num_committed_blocks
        first = max(start, seq.local_start)
        if end > first:
            hashes = seq.block_hashes
            for g, table in enumerate(seq.local_tables):
                keys = [_group_hash(h, g) for h in hashes[first:end]]
                self._register(keys, table[first:end], 0, end - first)
        if not seq.hold_local:
            self.drop_behind(seq)

    def drop_behind(self, seq: Sequence) -> None:
        """Give back the local blocks no query from ``seq.num_computed_tokens`` on reads."""
        if not seq.local_tables:
            return
        start = seq.local_start
        upto = min(self.first_live(seq.num_computed_tokens), len(seq.local_tables[0]))
        if upto > start:
            for t in seq.local_tables:
                self._release(t[start:upto])
                t[start:upto] = [0] * (upto - start)
            seq.local_start = upto

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """As :meth:`BlockManager.fork`; the child shares the parent's local blocks in the
        window of its first position, or nothing when the parent has given them back."""
        if child.block_table:
            raise RuntimeError(f"sequence {child.seq_id} already holds blocks")
        bs = self.block_size
        shared = min((child.num_tokens - 1) // bs, parent.num_computed_tokens // bs)
        lo = self.first_live(shared * bs)
        if lo < parent.local_start or not parent.local_tables:
            shared = lo = 0
        full = parent.block_table[:shared]
        local = [t[lo:shared] for t in parent.local_tables] if shared else []
        self._acquire(full)
        for t in local:
            self._acquire(t)
        child.block_table = list(full)
        child.local_tables = [[0] * lo + t for t in local]
        child.local_start = lo
        child.num_committed_blocks = shared
        child.num_computed_tokens = shared * bs
        child.num_cached_tokens = 0

    def free(self, seq: Sequence) -> None:
        for t in seq.local_tables:
            self._release(reversed(t[seq.local_start :]))
        seq.local_tables = []
        seq.local_start = 0
        super().free(seq)


# a sequence may take any length when a window of blocks fits: its context bounds it
UNBOUNDED_TOKENS = 1 << 40


class LocalBlocks(BlockManager):
    """The KV blocks of a model whose every layer sees the last ``window`` positions
    (Mistral v0.1's config): one table, whose entries before ``seq.local_start`` have been
    given back (0, never read), as :class:`WindowedBlocks`' local groups do. A sequence holds
    a window of blocks however long it runs; a prefix hit needs the blocks of the last
    window before its end cached, not the ones before."""

    def __init__(
        self, num_blocks: int, block_size: int, window: int, enable_prefix_caching: bool
    ) -> None:
        if window < 1:
            raise ValueError("a windowed pool needs a window of at least one position")
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.window = window

    def first_live(self, pos: int) -> int:
        """The first block that a query at ``pos`` reads."""
        return max(0, pos - self.window + 1) // self.block_size

    def held(self, seq: Sequence) -> int:
        return len(seq.block_table) - seq.local_start

    def capacity_tokens(self, chunk: int) -> int:
        bs = self.block_size
        live = -(-self.window // bs) + 2 + -(-chunk // bs)
        return UNBOUNDED_TOKENS if live <= self.num_blocks else self.num_blocks * bs

    def _hit(self, seq: Sequence) -> tuple[list[int], int, int]:
        """-> (the cached blocks of the hit's last window, its first block's index, the
        hit's length in blocks)."""
        if not self.enable_prefix_caching:
            return [], 0, 0
        hashes, cached = self._hashes(seq, (seq.num_tokens - 1) // self.block_size), self._cached
        k = _longest_window_hit(
            len(hashes),
            lambda n: self.first_live(n * self.block_size),
            lambda j: hashes[j] in cached,
        )
        lo = self.first_live(k * self.block_size) if k else 0
        return [cached[hashes[j]] for j in range(lo, k)], lo, k

    def match_prefix(self, seq: Sequence) -> list[int]:
        blocks, lo, _ = self._hit(seq)
        return [0] * lo + blocks

    def can_admit(self, seq: Sequence, budget: int) -> bool:
        blocks, _, k = self._hit(seq)
        cached = k * self.block_size
        new = self.blocks_for(cached + min(seq.num_tokens - cached, budget)) - k
        return new + sum(1 for b in blocks if self._ref[b] == 0) <= len(self._free)

    def admit(self, seq: Sequence) -> None:
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        blocks, lo, k = self._hit(seq)
        self._acquire(blocks)
        seq.block_table = [0] * lo + blocks
        seq.local_start = lo
        seq.num_committed_blocks = k
        seq.num_computed_tokens = k * self.block_size
        seq.num_cached_tokens = min(seq.num_computed_tokens, seq.prompt_len)

    def commit(self, seq: Sequence) -> None:
        """Offer the computed full blocks still held to the prefix cache; then the blocks
        behind the window of the next position go back (unless ``seq.hold_local``)."""
        if self.enable_prefix_caching:
            known = len(seq.token_ids) - seq.num_pending
            full = min(seq.num_computed_tokens, known) // self.block_size
            start = max(seq.num_committed_blocks, seq.local_start)
            if full > start:
                self._register(self._hashes(seq, full), seq.block_table, start, full)
            seq.num_committed_blocks = max(seq.num_committed_blocks, full)
        if not seq.hold_local:
            self.drop_behind(seq)

    def drop_behind(self, seq: Sequence) -> None:
        """Give back the blocks no query from ``seq.num_computed_tokens`` on reads."""
        table, start = seq.block_table, seq.local_start
        upto = min(self.first_live(seq.num_computed_tokens), len(table))
        if upto > start:
            self._release(table[start:upto])
            table[start:upto] = [0] * (upto - start)
            seq.local_start = upto

    def fork(self, parent: Sequence, child: Sequence) -> None:
        if child.block_table:
            raise RuntimeError(f"sequence {child.seq_id} already holds blocks")
        bs = self.block_size
        shared = min((child.num_tokens - 1) // bs, parent.num_computed_tokens // bs)
        lo = self.first_live(shared * bs)
        if lo < parent.local_start:
            shared = lo = 0
        blocks = parent.block_table[lo:shared]
        self._acquire(blocks)
        child.block_table = [0] * lo + blocks
        child.local_start = lo
        child.num_committed_blocks = shared
        child.num_computed_tokens = shared * bs
        child.num_cached_tokens = 0

    def free(self, seq: Sequence) -> None:
        self._release(reversed(seq.block_table[seq.local_start :]))
        seq.block_table = []
        seq.local_start = 0
        seq.num_committed_blocks = 0
        seq.num_computed_tokens = 0
