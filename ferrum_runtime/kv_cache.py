"""KV block manager over the runtime-owned paged cache: allocation, refcounts, automatic prefix reuse.

A block holds ``block_size`` consecutive positions of one sequence. A *full* block gets a chain hash
``hash(parent_hash, its tokens)``, so equal hashes mean equal prefixes; a later request whose prompt
starts with those tokens reuses the block instead of recomputing it. A block nobody references goes
back to the pool: uncached blocks to the free list, cached ones to an LRU that keeps them reusable
until their space is needed. Pure Python, no TVM.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Sequence


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    return hash((parent, tuple(tokens)))


class NoFreeBlocks(RuntimeError):
    """Raised by ``allocate`` when every block is referenced; the scheduler preempts and retries."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refcount = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, no cached content
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, cached content, LRU first
        self._cached: dict[int, int] = {}  # chain hash -> block
        self.hits = 0  # prefix-cache lookups that reused blocks, and the tokens they saved
        self.queries = 0
        self.saved_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks that ``allocate`` can hand out now."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self.block_hash[block]]  # type: ignore[arg-type]
            self.block_hash[block] = None
        else:
            raise NoFreeBlocks
        self.refcount[block] = 1
        return block

    def acquire(self, block: int) -> None:
        """One more reference to a block (a cache hit, or a sibling sharing a prompt)."""
        if self.refcount[block] == 0:
            self._evictable.pop(block, None)
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        assert self.refcount[block] > 0, f"block {block} released more often than acquired"
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if self.block_hash[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def release_all(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # the tail of a sequence is the least likely to be shared: evict it first
            self.release(b)

    def register(self, block: int, h: int) -> None:
        """``block`` is now full and holds the prefix whose chain hash is ``h``."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None:
            return
        if h in self._cached:  # the same content exists already (computed twice concurrently)
            return
        self.block_hash[block] = h
        self._cached[h] = block

    def match_prefix(self, tokens: Sequence[int], max_blocks: int) -> tuple[list[int], list[int]]:
        """Cached blocks holding the longest prefix of ``tokens`` (at most ``max_blocks``), acquired for
        the caller; returns them with their chain hashes."""
        blocks: list[int] = []
        hashes: list[int] = []
        if not self.enable_prefix_caching:
            return blocks, hashes
        self.queries += 1
        parent: int | None = None
        for i in range(min(max_blocks, len(tokens) // self.block_size)):
            h = chain_hash(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self._cached.get(h)
            if block is None:
                break
            self.acquire(block)
            blocks.append(block)
            hashes.append(h)
            parent = h
        if blocks:
            self.hits += 1
            self.saved_tokens += len(blocks) * self.block_size
        return blocks, hashes

    def check_invariants(self) -> None:
        """Every block is in exactly one of: referenced, free, evictable; the cache index is consistent."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable
        for b in range(self.num_blocks):
            in_use = self.refcount[b] > 0
            assert in_use + (b in free) + (b in evictable) == 1, f"block {b} in {in_use}, {b in free}, {b in evictable}"
            if b in evictable:
                assert self.block_hash[b] is not None
        assert all(self.block_hash[b] == h for h, b in self._cached.items())
        assert sum(h is not None for h in self.block_hash) == len(self._cached)
