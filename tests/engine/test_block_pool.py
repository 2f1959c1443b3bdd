"""BlockPool: reference counts, prefix-cache lookup, LRU eviction and events."""

from __future__ import annotations

import pytest

from pdserve.engine.block_hash import ROOT_HASH, hash_block, hash_blocks
from pdserve.engine.block_pool import BlockPool


def test_allocate_free_and_exhaustion():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1
    with pytest.raises(RuntimeError, match="asked for 2"):
        pool.allocate(2)
    pool.free(a)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([a[0]])


def test_cached_block_survives_free_until_evicted_lru_first():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache(a, 111)
    pool.cache(b, 222)
    pool.free([a, b, c])  # free order: a then b then c -> a is evicted first
    assert pool.lookup(111) == a and pool.lookup(222) == b
    assert pool.drain_events().stored == [111, 222]
    (x,) = pool.allocate(1)
    assert x == a and pool.lookup(111) is None and pool.lookup(222) == b
    assert pool.drain_events().removed == [111]


def test_touch_takes_a_cached_free_block_out_of_the_free_list():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, 7)
    pool.free([a, b])
    pool.touch([a])
    assert pool.ref_count(a) == 1 and pool.num_free == 1
    assert pool.allocate(1) == [b]  # a is in use, so it is not handed out
    assert pool.lookup(7) == a


def test_duplicate_hash_is_not_registered_twice():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, 5)
    pool.cache(b, 5)
    assert pool.lookup(5) == a and pool.num_cached == 1


def test_block_hashes_are_chained_and_stable():
    tokens = list(range(10))
    hashes = hash_blocks(tokens, 4)
    assert len(hashes) == 2  # the trailing partial block has no hash
    assert hashes[0] == hash_block(ROOT_HASH, [0, 1, 2, 3])
    assert hashes[1] == hash_block(hashes[0], [4, 5, 6, 7])
    # same tokens under another prefix hash differently
    assert hash_blocks([9, 9, 9, 9, *tokens[4:8]], 4)[1] != hashes[1]
    # A pinned value: the router hashes prompts in another process and must get the same numbers.
    assert hash_block(ROOT_HASH, (1, 2, 3)) == 16958249009808338657
