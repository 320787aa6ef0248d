"""KV block pool: free list, reference counts, per-request block tables, and automatic prefix caching.

Plain Python on purpose: it is bookkeeping, and the scheduler calls it for every request every step.
A full block is keyed by hash(parent block's key, its token ids), so equal prefixes map to equal keys.
Freed blocks keep their key and content until the pool hands them out again, least recently used first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: int | None = None  # prefix-cache key, set once the block is full and computed


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks in eviction order (front = evicted first); cached ones are still hashed.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # key -> block id
        self.tables: dict[str, list[int]] = {}
        self._keys: dict[str, list[int]] = {}  # keys of each request's full, registered blocks

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Block ids caching the longest full-block prefix of `token_ids`, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        parent = None
        for start in range(0, len(token_ids) - 1 - self.block_size + 1, self.block_size):
            parent = hash((parent, tuple(token_ids[start:start + self.block_size])))
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def allocate(self, request_id: str, num_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Grow the request's table to hold `num_tokens` tokens; False (and no change) when the pool is short."""
        table = self.tables.get(request_id)
        if table is None:
            table = []
            cached_blocks = cached_blocks or []
        else:
            cached_blocks = []
        new = self.blocks_needed(num_tokens) - len(table) - len(cached_blocks)
        reusable = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if new > self.num_free_blocks - reusable:
            return False
        for block_id in cached_blocks:
            self._ref(block_id)
        table.extend(cached_blocks)
        for _ in range(max(new, 0)):
            table.append(self._take_free())
        self.tables[request_id] = table
        self._keys.setdefault(request_id, [])
        return True

    def cache_blocks(self, request_id: str, num_computed: int, token_slice: Callable[[int, int], list[int]]) -> None:
        """Register the request's blocks that are full and computed, so later requests can share them.

        `token_slice(start, end)` gives the request's token ids; only new full blocks are read.
        """
        if not self.enable_prefix_caching:
            return
        keys, table, bs = self._keys[request_id], self.tables[request_id], self.block_size
        for i in range(len(keys), num_computed // bs):
            parent = keys[-1] if keys else None
            key = hash((parent, tuple(token_slice(i * bs, (i + 1) * bs))))
            keys.append(key)
            block = self.blocks[table[i]]
            if block.key is None and key not in self._cached:
                block.key = key
                self._cached[key] = block.block_id

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Give back the blocks past `num_tokens` (e.g. slots reserved for rejected speculative tokens).

        The last kept block, when partial, will be written again from the middle: it leaves the prefix
        cache, and it must not be shared (ValueError, nothing changed) since others read its content.
        """
        table, bs = self.tables[request_id], self.block_size
        keep = self.blocks_needed(num_tokens)
        partial = self.blocks[table[keep - 1]] if num_tokens % bs and keep <= len(table) else None
        if partial is not None and partial.ref_count > 1:
            raise ValueError(f"cannot trim {request_id!r} into block {partial.block_id}: it is shared")
        while len(table) > keep:
            self._unref(table.pop())
        del self._keys[request_id][num_tokens // bs:]
        if partial is not None and partial.key is not None:
            del self._cached[partial.key]
            partial.key = None

    def free(self, request_id: str) -> None:
        table = self.tables.pop(request_id, [])
        self._keys.pop(request_id, None)
        # Tail blocks first, so a shared prefix outlives the suffixes that hang off it.
        for block_id in reversed(table):
            self._unref(block_id)

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None:  # evict: its content is about to be overwritten
            del self._cached[block.key]
            block.key = None
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} freed twice"
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.key is None:
                self._free[block_id] = None
                self._free.move_to_end(block_id, last=False)  # uncached blocks are the cheapest to reuse
            else:
                self._free[block_id] = None
