"""Block manager invariants under random allocate / grow / share / free / evict sequences."""
from __future__ import annotations

from collections import Counter

import pytest

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.block_manager import BlockManager

BS = 4


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(4, 24), caching=st.booleans())
    def setup(self, num_blocks, caching):
        self.bm = BlockManager(num_blocks, BS, enable_prefix_caching=caching)
        self.tokens: dict[str, list[int]] = {}  # request -> tokens it holds (all computed)
        self.next_id = 0

    def _register(self, rid: str) -> None:
        toks = self.tokens[rid]
        self.bm.cache_blocks(rid, len(toks), lambda a, b: toks[a:b])

    # A tiny alphabet makes shared prefixes (and so cache hits) common.
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=30))
    def allocate(self, tokens):
        rid = f"r{self.next_id}"
        self.next_id += 1
        cached = self.bm.find_cached_prefix(tokens)
        assert len(cached) * BS < len(tokens)  # at least one token is always left to compute
        if self.bm.allocate(rid, len(tokens), cached):
            self.tokens[rid] = list(tokens)
            self._register(rid)
        else:
            assert rid not in self.bm.tables

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), min_size=1, max_size=9))
    def grow(self, data, extra):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        before = list(self.bm.tables[rid])
        if self.bm.allocate(rid, len(self.tokens[rid]) + len(extra)):
            self.tokens[rid] += extra
            self._register(rid)
            assert self.bm.tables[rid][:len(before)] == before  # growing never moves existing blocks
        else:
            assert self.bm.tables[rid] == before

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), cut=st.integers(0, 8))
    def trim(self, data, cut):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        keep = max(1, len(self.tokens[rid]) - cut)
        table = list(self.bm.tables[rid])
        partial = self.bm.blocks[table[self.bm.blocks_needed(keep) - 1]] if keep % BS else None
        if partial is not None and partial.ref_count > 1:
            with pytest.raises(ValueError, match="shared"):
                self.bm.trim(rid, keep)
            assert self.bm.tables[rid] == table  # refused whole
            return
        self.bm.trim(rid, keep)
        self.tokens[rid] = self.tokens[rid][:keep]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(rid)
        del self.tokens[rid]

    @invariant()
    def refcounts_match_tables(self):
        if not hasattr(self, "bm"):
            return
        owners = Counter(b for table in self.bm.tables.values() for b in table)
        for block in self.bm.blocks:
            assert block.ref_count >= 0
            assert block.ref_count == owners.get(block.block_id, 0)
            assert (block.block_id in self.bm._free) == (block.ref_count == 0)
        for rid, table in self.bm.tables.items():
            assert len(set(table)) == len(table), "a request owns a block twice"
            assert len(table) == self.bm.blocks_needed(len(self.tokens[rid]))
        for key, block_id in self.bm._cached.items():
            assert self.bm.blocks[block_id].key == key

    @invariant()
    def cached_keys_match_content(self):
        # a block may be found under a key only while it holds exactly those tokens
        if not hasattr(self, "bm"):
            return
        for rid, table in self.bm.tables.items():
            toks, parent = self.tokens[rid], None
            for i, b in enumerate(table):
                if (i + 1) * BS > len(toks):  # partial: it will be written again, so it is never cached
                    assert self.bm.blocks[b].key is None
                    break
                parent = hash((parent, tuple(toks[i * BS:(i + 1) * BS])))
                key = self.bm.blocks[b].key
                assert key is None or key == parent

    @invariant()
    def shared_blocks_hold_equal_prefixes(self):
        # two requests may share a block only if their tokens up to its end are equal
        if not hasattr(self, "bm"):
            return
        seen: dict[int, tuple] = {}
        for rid, table in self.bm.tables.items():
            for i, b in enumerate(table[: len(self.tokens[rid]) // BS]):
                prefix = tuple(self.tokens[rid][: (i + 1) * BS])
                if self.bm.blocks[b].key is not None:
                    assert seen.setdefault(b, prefix) == prefix

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for rid in list(self.tokens):
            self.bm.free(rid)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_prefix_is_shared_and_evicted_lru():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = list(range(10))  # two full blocks + 2 tokens
    assert bm.allocate("a", len(a))
    bm.cache_blocks("a", len(a), lambda s, e: a[s:e])
    hit = bm.find_cached_prefix(a[:8] + [99, 98])
    assert hit == bm.tables["a"][:2]
    assert bm.allocate("b", 10, hit)
    assert bm.blocks[hit[0]].ref_count == 2
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2
    # the cached blocks are handed out last, and lose their key when reused
    assert bm.allocate("c", 4 * BS)
    assert bm.num_cached_blocks == 2
    assert bm.allocate("d", 2 * BS)
    assert bm.num_cached_blocks == 0
    assert bm.find_cached_prefix(a) == []
