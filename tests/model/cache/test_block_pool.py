"""Block pool: chained hashes salted by tenant, reference counts, LRU eviction, exhaustion, integrity."""
from __future__ import annotations

import random

import pytest

from model.cache.block_pool import BlockPool


def fill(pool: BlockPool, tokens: list[int], salt: str = "") -> list[int]:
    """Allocate blocks for `tokens` and register the full ones, as the scheduler does."""
    blocks = pool.allocate(-(-len(tokens) // pool.block_size))
    for block, block_hash in zip(blocks, pool.hash_prefix_blocks(tokens, salt)):
        pool.cache_block(block, block_hash)
    return blocks


def snapshot(pool: BlockPool):
    return (list(pool.ref_counts), list(pool.block_hashes), list(pool.free_queue),
            {h: list(c) for h, c in pool.cached.items()}, pool.num_evictions, pool.num_cached_free_blocks)


# ---- hashing ----------------------------------------------------------------------------------
def test_hash_chaining_and_salt():
    h = BlockPool.hash_block
    assert h(None, [1, 2], "") == h(None, [1, 2], "")
    assert len(h(None, [1, 2], "")) == 16
    root_a, root_b = h(None, [1, 2], ""), h(None, [3, 4], "")
    assert h(root_a, [5, 6], "") != h(root_b, [5, 6], "")       # same tokens after another prefix
    assert h(root_a, [5, 6], "") == h(h(None, [1, 2], ""), [5, 6], "")
    assert h(None, [1, 2], "alice") != h(None, [1, 2], "bob")   # another tenant
    assert h(None, [1, 2], "") != h(None, [1, 2, 0], "")
    assert h(None, [1, 2], "") != h(root_a, [1, 2], "")         # a root block is not a child block
    assert h(None, [2, 1], "") != h(None, [1, 2], "")
    assert h(None, [256], "") != h(None, [1, 0], "")            # fixed-width token encoding
    assert h(None, [1], "a") != h(None, [1], "a\x00")           # length-prefixed salt
    assert h(None, (1, 2), "x") == h(None, [1, 2], "x")


def test_hash_prefix_blocks_covers_full_blocks_only_and_chains():
    pool = BlockPool(4, 3)
    tokens = [5, 6, 7, 8, 9, 10, 11]
    hashes = pool.hash_prefix_blocks(tokens, "t")
    assert len(hashes) == 2
    assert hashes[0] == BlockPool.hash_block(None, [5, 6, 7], "t")
    assert hashes[1] == BlockPool.hash_block(hashes[0], [8, 9, 10], "t")
    assert pool.hash_prefix_blocks(tokens[:2], "t") == []
    assert pool.hash_prefix_blocks(tokens[:6], "t") == hashes
    assert pool.hash_prefix_blocks(tokens, "u") != hashes


def test_bad_sizes_are_value_errors():
    with pytest.raises(ValueError):
        BlockPool(0, 16)
    with pytest.raises(ValueError):
        BlockPool(4, 0)


# ---- reference counts -------------------------------------------------------------------------
def test_refcounts_acquire_release_and_gauges():
    pool = BlockPool(8, 2)
    assert pool.num_free_blocks == 8 and pool.num_used_blocks == 0 and pool.usage == 0.0
    a = fill(pool, [1, 2, 3, 4, 5])
    assert len(a) == 3 and pool.num_used_blocks == 3 and pool.usage == 3 / 8
    assert [pool.ref_counts[b] for b in a] == [1, 1, 1]
    assert pool.block_hash_of(a[2]) is None                    # partial block: never hashed
    hits = pool.lookup_prefix([1, 2, 3, 4, 9], "")
    assert hits == a[:2]
    assert [pool.ref_counts[b] for b in a] == [1, 1, 1]        # lookup takes no reference
    pool.acquire(hits)
    assert [pool.ref_counts[b] for b in a] == [2, 2, 1]
    pool.check_integrity([a, hits])
    pool.release(a)
    pool.check_integrity([hits])
    assert pool.num_used_blocks == 2 and pool.num_cached_free_blocks == 0
    pool.release(hits)
    pool.check_integrity([])
    assert pool.num_free_blocks == 8 and pool.num_cached_free_blocks == 2 and pool.usage == 0.0


def test_releasing_an_unreferenced_block_is_a_bug():
    pool = BlockPool(4, 2)
    a = pool.allocate(1)
    pool.release(a)
    with pytest.raises(AssertionError, match="released more often"):
        pool.release(a)
    with pytest.raises(AssertionError, match="released more often"):
        pool.release([3])
    with pytest.raises(AssertionError, match="outside"):
        pool.release([-1])
    with pytest.raises(AssertionError, match="outside"):
        pool.acquire([4])


def test_exhaustion_returns_none_and_changes_nothing():
    pool = BlockPool(4, 2)
    held = fill(pool, [1, 2, 3, 4])
    pool.release(held[1:])
    held = held[:1] + pool.allocate(1)
    before = snapshot(pool)
    assert pool.allocate(3) is None
    assert snapshot(pool) == before
    assert pool.num_free_blocks == 2
    pool.check_integrity([held])
    assert pool.allocate(0) == []
    more = pool.allocate(2)
    assert more is not None and pool.num_free_blocks == 0
    assert pool.allocate(1) is None
    pool.check_integrity([held, more])


def test_allocated_blocks_are_distinct_and_were_free():
    pool = BlockPool(10, 4)
    a, b, c = pool.allocate(3), pool.allocate(3), pool.allocate(4)
    assert sorted(a + b + c) == list(range(10))
    pool.check_integrity([a, b, c])


# ---- LRU eviction -----------------------------------------------------------------------------
def test_lru_eviction_order_least_recently_freed_first_and_tail_blocks_first():
    pool = BlockPool(6, 2)
    old = fill(pool, [1, 2, 3, 4, 5, 6])       # 3 cached blocks
    new = fill(pool, [7, 8, 9, 10, 11, 12])     # 3 cached blocks
    pool.release(old)
    pool.release(new)
    assert pool.num_cached_free_blocks == 6
    # old's tail block goes first, then old's middle, then its head; new's survive longest
    expected_order = [old[2], old[1], old[0], new[2], new[1], new[0]]
    for i, block in enumerate(expected_order):
        assert pool.block_hash_of(block) is not None
        assert pool.allocate(1) == [block]
        assert pool.block_hash_of(block) is None
        assert pool.num_evictions == i + 1
        if i == 0:
            assert pool.lookup_prefix([1, 2, 3, 4, 5, 6], "") == old[:2]
        if i == 2:
            assert pool.lookup_prefix([1, 2, 3, 4, 5, 6], "") == []
            assert pool.lookup_prefix([7, 8, 9, 10, 11, 12], "") == new
    pool.check_integrity([[b] for b in expected_order])


def test_unhashed_blocks_are_reused_before_any_cached_block_is_evicted():
    pool = BlockPool(6, 2)
    seq = fill(pool, [1, 2, 3, 4, 5])           # 2 cached blocks + a partial one
    scratch = pool.allocate(2)                   # never hashed
    pool.release(seq)
    pool.release(scratch)
    assert pool.num_free_blocks == 6 and pool.num_cached_free_blocks == 2
    taken = pool.allocate(4)
    assert set(taken) == set(scratch) | {seq[2], 5}
    assert pool.num_evictions == 0
    assert pool.lookup_prefix([1, 2, 3, 4], "") == seq[:2]
    pool.check_integrity([taken])


def test_reacquired_and_released_again_moves_to_the_back_of_the_queue():
    pool = BlockPool(4, 2)
    a = fill(pool, [1, 2])
    b = fill(pool, [3, 4])
    pool.release(a)
    pool.release(b)
    pool.acquire(pool.lookup_prefix([1, 2], ""))  # a is used again ...
    pool.release(a)                              # ... and freed after b
    rest = pool.allocate(2)                      # the two never-used blocks
    assert pool.allocate(1) == b                 # b is now the least recently freed
    assert pool.lookup_prefix([1, 2], "") == a
    pool.check_integrity([rest, b])


def test_cache_hit_on_free_block_takes_it_out_of_the_queue():
    pool = BlockPool(4, 2)
    blocks = fill(pool, [1, 2, 3, 4])
    pool.release(blocks)
    assert pool.num_cached_free_blocks == 2
    hits = pool.lookup_prefix([1, 2, 3, 4, 5], "")
    assert hits == blocks
    pool.acquire(hits)
    assert pool.num_free_blocks == 2 and pool.num_cached_free_blocks == 0
    assert all(b not in pool.free_queue for b in hits)
    fresh = pool.allocate(2)
    assert set(fresh).isdisjoint(hits) and pool.num_evictions == 0
    assert pool.allocate(1) is None
    pool.check_integrity([hits, fresh])


# ---- lookups ----------------------------------------------------------------------------------
def test_lookup_stops_at_first_miss_and_respects_the_tenant():
    pool = BlockPool(8, 2)
    blocks = fill(pool, [1, 2, 3, 4, 5, 6], salt="alice")
    assert pool.lookup_prefix([1, 2, 9, 9, 5, 6], "alice") == blocks[:1]
    assert pool.lookup_prefix([9, 9, 3, 4, 5, 6], "alice") == []
    assert pool.lookup_prefix([1, 2, 3, 4, 5, 6], "bob") == []
    assert pool.lookup_prefix([1, 2, 3, 4, 5, 6], "alice", max_blocks=2) == blocks[:2]
    assert pool.lookup_prefix([1, 2, 3, 4, 5, 6], "alice", max_blocks=0) == []
    assert pool.lookup_prefix([1, 2, 3, 4, 5], "alice") == blocks[:2]   # the partial block never matches
    assert pool.lookup_prefix([], "alice") == []
    pool.check_integrity([blocks])


def test_lookup_stops_at_an_evicted_middle_block_even_if_later_ones_are_cached():
    pool = BlockPool(3, 2)
    blocks = fill(pool, [1, 2, 3, 4, 5, 6])
    pool.release([blocks[1]])                     # only the middle block is free
    taken = pool.allocate(1)
    assert taken == [blocks[1]] and pool.num_evictions == 1
    assert pool.block_hash_of(blocks[2]) is not None
    assert pool.lookup_prefix([1, 2, 3, 4, 5, 6], "") == blocks[:1]
    pool.check_integrity([[blocks[0], blocks[2]], taken])


def test_tenant_b_never_reuses_tenant_a_blocks():
    pool = BlockPool(6, 2)
    tokens = [1, 2, 3, 4]
    a = fill(pool, tokens, "A")
    pool.release(a)
    assert pool.lookup_prefix(tokens, "B") == []
    b = fill(pool, tokens, "B")
    assert set(a).isdisjoint(b)
    assert pool.lookup_prefix(tokens, "A") == a and pool.lookup_prefix(tokens, "B") == b
    pool.check_integrity([b])


# ---- several copies of one prefix -------------------------------------------------------------
def test_two_copies_of_a_block_both_stay_findable_and_referenced_copy_is_preferred():
    pool = BlockPool(4, 2)
    first = fill(pool, [1, 2])
    second = fill(pool, [1, 2])                   # computed again while the first is held
    assert pool.block_hash_of(first[0]) == pool.block_hash_of(second[0])
    pool.release(first)
    assert pool.lookup_prefix([1, 2], "") == second      # the referenced copy
    pool.release(second)
    assert pool.num_cached_free_blocks == 2
    taken = pool.allocate(3)                      # evicts `first` (freed earlier), keeps `second`
    assert first[0] in taken and second[0] not in taken
    assert pool.lookup_prefix([1, 2], "") == second
    pool.check_integrity([taken])


def test_cache_block_is_idempotent_and_a_hash_never_changes():
    pool = BlockPool(2, 2)
    [block] = pool.allocate(1)
    h1, h2 = BlockPool.hash_block(None, [1, 2], ""), BlockPool.hash_block(None, [3, 4], "")
    pool.cache_block(block, h1)
    pool.cache_block(block, h1)
    assert pool.block_hash_of(block) == h1 and list(pool.cached[h1]) == [block]
    with pytest.raises(AssertionError, match="another hash"):
        pool.cache_block(block, h2)
    pool.check_integrity([[block]])


def test_reset_prefix_cache_forgets_everything_but_keeps_references():
    pool = BlockPool(4, 2)
    held = fill(pool, [1, 2, 3, 4])
    pool.release(held[1:])
    pool.reset_prefix_cache()
    assert pool.lookup_prefix([1, 2, 3, 4], "") == []
    assert pool.num_cached_free_blocks == 0 and pool.num_used_blocks == 1
    pool.check_integrity([held[:1]])


# ---- integrity --------------------------------------------------------------------------------
def test_integrity_check_catches_wrong_holders():
    pool = BlockPool(4, 2)
    held = pool.allocate(2)
    pool.check_integrity([held])
    with pytest.raises(AssertionError, match="holders"):
        pool.check_integrity([held[:1]])          # a reference nobody accounts for (a leak)
    with pytest.raises(AssertionError, match="holders"):
        pool.check_integrity([held, held[:1]])    # a holder without a reference
    with pytest.raises(AssertionError, match="outside"):
        pool.check_integrity([held, [7]])


def test_integrity_check_catches_corrupted_state():
    def corrupt(change):
        pool = BlockPool(4, 2)
        held = fill(pool, [1, 2, 3, 4])
        pool.release(held[1:])
        change(pool, held)
        with pytest.raises(AssertionError):
            pool.check_integrity([held[:1]])

    corrupt(lambda p, h: p.ref_counts.__setitem__(h[0], 0))              # held but counted free
    corrupt(lambda p, h: p.free_queue.__setitem__(h[0], None))           # held and in the free queue
    corrupt(lambda p, h: p.free_queue.pop(h[1]))                          # a block lost
    corrupt(lambda p, h: p.block_hashes.__setitem__(h[0], b"x" * 16))    # stale hash map entry
    corrupt(lambda p, h: p.cached.clear())                                # a hash not in the map
    corrupt(lambda p, h: setattr(p, "_num_cached_free", 0))               # gauge out of step


# ---- random operations ------------------------------------------------------------------------
def test_random_operations_keep_every_invariant():
    """Requests of two tenants come and go with shared prefixes; after every operation the pool is
    intact, every lookup returns blocks carrying the right chained hashes, and the free queue is
    in the order the release rules say."""
    rng = random.Random(1234)
    pool = BlockPool(24, 4)
    live: list[list[int]] = []
    order: list[int] = list(range(24))            # our model of the free queue
    for _ in range(2000):
        op = rng.random()
        if op < 0.55:
            tenant = rng.choice("AB")
            tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
            hits = pool.lookup_prefix(tokens, tenant, max_blocks=(len(tokens) - 1) // 4)
            hashes = pool.hash_prefix_blocks(tokens, tenant)
            assert [pool.block_hash_of(b) for b in hits] == hashes[:len(hits)]
            pool.acquire(hits)
            order = [b for b in order if b not in hits]
            needed = -(-len(tokens) // 4) - len(hits)
            fresh = pool.allocate(needed)
            if fresh is None:
                assert needed > len(order)
                pool.release(hits)
                for b in reversed(hits):
                    if pool.ref_counts[b] == 0:
                        order.append(b)
            else:
                assert fresh == order[:needed]
                order = order[needed:]
                blocks = hits + fresh
                for block, block_hash in zip(blocks, hashes):
                    pool.cache_block(block, block_hash)
                live.append(blocks)
        elif live:
            blocks = live.pop(rng.randrange(len(live)))
            pool.release(blocks)
            for b in reversed(blocks):
                if pool.ref_counts[b] == 0:
                    if pool.block_hash_of(b) is None:
                        order.insert(0, b)
                    else:
                        order.append(b)
        pool.check_integrity(live)
        assert list(pool.free_queue) == order
    for blocks in live:
        pool.release(blocks)
    pool.check_integrity([])
    assert pool.num_free_blocks == 24 and pool.num_evictions > 0
