"""Block pool: chained hashes salted by tenant, reference counts, LRU eviction, exhaustion."""
from __future__ import annotations

import pytest

from model.block_pool import BlockPool


def fill(pool: BlockPool, tokens: list[int], salt: str = "") -> list[int]:
    """Allocate blocks for `tokens` and register the full ones, as the scheduler does."""
    blocks = pool.allocate(-(-len(tokens) // pool.block_size))
    for block, block_hash in zip(blocks, pool.hash_prefix_blocks(tokens, salt)):
        pool.cache_block(block, block_hash)
    return blocks


def test_hash_chaining_and_salt():
    h = BlockPool.hash_block
    assert h(None, [1, 2], "") == h(None, [1, 2], "")
    root_a, root_b = h(None, [1, 2], ""), h(None, [3, 4], "")
    assert h(root_a, [5, 6], "") != h(root_b, [5, 6], "")       # same tokens after another prefix
    assert h(None, [1, 2], "alice") != h(None, [1, 2], "bob")   # another tenant
    assert h(None, [1, 2], "") != h(None, [1, 2, 0], "")


def test_refcounts_acquire_release_and_integrity():
    pool = BlockPool(8, 2)
    a = fill(pool, [1, 2, 3, 4, 5])
    assert len(a) == 3 and pool.num_used_blocks == 3
    hits = pool.lookup_prefix([1, 2, 3, 4, 9], "")
    assert hits == a[:2]
    pool.acquire(hits)
    pool.check_integrity([a, hits])
    pool.release(a)
    pool.check_integrity([hits])
    assert pool.num_used_blocks == 2
    pool.release(hits)
    pool.check_integrity([])
    assert pool.num_free_blocks == 8 and pool.num_cached_free_blocks == 2
    with pytest.raises(AssertionError):
        pool.release([a[0]])


def test_exhaustion_returns_none_and_changes_nothing():
    pool = BlockPool(4, 2)
    held = pool.allocate(3)
    assert pool.allocate(2) is None
    assert pool.num_free_blocks == 1
    pool.check_integrity([held])
    assert pool.allocate(1) is not None


def test_lru_eviction_order_least_recently_freed_first_and_tail_blocks_first():
    pool = BlockPool(6, 2)
    old = fill(pool, [1, 2, 3, 4, 5, 6])       # 3 cached blocks
    new = fill(pool, [7, 8, 9, 10, 11, 12])     # 3 cached blocks
    pool.release(old)
    pool.release(new)
    # old's tail block goes first, then old's middle, then its head; new's survive longest
    taken = pool.allocate(1)
    assert taken == [old[2]]
    assert pool.lookup_prefix([1, 2, 3, 4, 5, 6], "") == old[:2]
    pool.allocate(2)
    assert pool.lookup_prefix([1, 2, 3, 4, 5, 6], "") == []
    assert pool.lookup_prefix([7, 8, 9, 10, 11, 12], "") == new
    assert pool.num_evictions == 3


def test_cache_hit_on_free_block_takes_it_out_of_the_queue():
    pool = BlockPool(4, 2)
    blocks = fill(pool, [1, 2, 3, 4])
    pool.release(blocks)
    hits = pool.lookup_prefix([1, 2, 3, 4, 5], "")
    pool.acquire(hits)
    assert pool.num_free_blocks == 2
    fresh = pool.allocate(2)
    assert set(fresh).isdisjoint(hits)
    pool.check_integrity([hits, fresh])


def test_lookup_stops_at_first_miss_and_respects_the_tenant():
    pool = BlockPool(8, 2)
    blocks = fill(pool, [1, 2, 3, 4, 5, 6], salt="alice")
    assert pool.lookup_prefix([1, 2, 9, 9, 5, 6], "alice") == blocks[:1]
    assert pool.lookup_prefix([1, 2, 3, 4, 5, 6], "bob") == []
    assert pool.lookup_prefix([1, 2, 3, 4, 5, 6], "alice", max_blocks=2) == blocks[:2]


def test_integrity_check_catches_corruption():
    pool = BlockPool(4, 2)
    held = pool.allocate(2)
    with pytest.raises(AssertionError, match="holders"):
        pool.check_integrity([held[:1]])
    pool.ref_counts[held[0]] = 0
    with pytest.raises(AssertionError):
        pool.check_integrity([held])
