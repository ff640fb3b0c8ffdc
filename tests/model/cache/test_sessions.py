"""Session pins: survive pressure until their turn (LRU first), TTL, caps, tenants, release."""
from __future__ import annotations

import time

import pytest

from model.cache.block_pool import BlockPool
from model.cache.sessions import SessionTable

BS = 2


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(num_blocks=16, max_sessions=8, ttl=100.0, fraction=1.0, pool=None):
    pool = pool or BlockPool(num_blocks, BS)
    clock = FakeClock()
    evictions = []
    table = SessionTable(pool, max_sessions, ttl, fraction, bytes_per_token=10, clock=clock,
                         on_evict=lambda: evictions.append(1))
    return pool, table, clock, evictions


def finished_turn(pool, table, tenant, session, tokens, keep=None):
    """A request finished, as the scheduler runs it: it reused the cached prefix (leaving one token
    to compute), computed the rest, its full blocks go to the session pin, then it releases all it
    held. Returns the pinned blocks."""
    hits = pool.lookup_prefix(tokens, tenant, max_blocks=(len(tokens) - 1) // pool.block_size)
    pool.acquire(hits)
    rest = pool.allocate(-(-len(tokens) // pool.block_size) - len(hits))
    assert rest is not None, "test pool too small"
    blocks = hits + rest
    for block, block_hash in zip(blocks, pool.hash_prefix_blocks(tokens, tenant)):
        pool.cache_block(block, block_hash)
    full = len(tokens) // pool.block_size
    table.pin(tenant, session, tokens[: full * pool.block_size], blocks[:full])
    pool.release(blocks)
    check(pool, table, keep)
    return blocks[:full]


def check(pool, table, *others):
    pool.check_integrity([held for held in others if held] + table.holders())


def names(table, tenant="t"):
    return [s.session_id for s in table.list(tenant)]


def test_bad_config_is_a_value_error():
    pool = BlockPool(4, BS)
    for args in [(-1, 10, 0.5), (1, 0, 0.5), (1, 10, 1.5), (1, 10, -0.1)]:
        with pytest.raises(ValueError):
            SessionTable(pool, *args)
    with pytest.raises(ValueError):
        SessionTable(pool, 1, 10, 0.5, bytes_per_token=-1)


# ---- pressure ---------------------------------------------------------------------------------
def test_pins_survive_allocation_pressure_until_evicted_lru_first():
    pool, table, clock, evictions = make(num_blocks=8)
    first = finished_turn(pool, table, "t", "s1", [1, 2, 3, 4])
    clock.now = 1
    second = finished_turn(pool, table, "t", "s2", [5, 6, 7, 8])
    other = pool.allocate(4)               # takes the 4 unpinned blocks; pins stay
    assert set(other).isdisjoint(first + second)
    assert pool.allocate(1) is None
    assert pool.lookup_prefix([1, 2, 3, 4], "t") == first and pool.lookup_prefix([5, 6, 7, 8], "t") == second
    assert table.evict_for_pressure(0) == 0 and table.evict_for_pressure(2) == 1
    assert names(table) == ["s2"]          # the least recently used went first
    assert len(evictions) == 1 and table.num_evictions == 1
    check(pool, table, other)
    other += pool.allocate(2)              # s1's blocks are now taken and evicted
    assert pool.lookup_prefix([1, 2, 3, 4], "t") == [] and pool.lookup_prefix([5, 6, 7, 8], "t") == second
    assert table.evict_for_pressure(1) == 1 and table.num_sessions == 0
    assert table.evict_for_pressure(1) == 0
    check(pool, table, other)


def test_touch_and_get_change_the_eviction_order():
    pool, table, clock, _ = make(num_blocks=6)
    for name, tokens in [("a", [1, 2]), ("b", [3, 4]), ("c", [5, 6])]:
        finished_turn(pool, table, "t", name, tokens)
    assert table.get("t", "a") is not None
    assert table.touch("t", "b") and not table.touch("t", "nope")
    assert names(table) == ["c", "a", "b"]
    held = pool.allocate(3)
    assert table.evict_for_pressure(2) == 2
    assert names(table) == ["b"]
    check(pool, table, held)


def test_pressure_eviction_of_a_pin_shared_with_a_running_request_frees_nothing_and_goes_on():
    pool, table, clock, evictions = make(num_blocks=4)
    a = finished_turn(pool, table, "t", "a", [1, 2])
    clock.now = 1
    b = finished_turn(pool, table, "t", "b", [3, 4])
    running = pool.lookup_prefix([1, 2, 9], "t")   # a running request reuses a's block
    pool.acquire(running)
    held = pool.allocate(2)
    assert table.evict_for_pressure(1) == 2        # a's pin frees nothing, so b goes too
    assert list(pool.free_queue) == b
    assert pool.ref_counts[a[0]] == 1 and len(evictions) == 2
    check(pool, table, running, held)


def test_pressure_stops_when_no_session_is_left():
    pool, table, _, _ = make(num_blocks=4)
    finished_turn(pool, table, "t", "a", [1, 2])
    held = pool.allocate(3)
    assert table.evict_for_pressure(10) == 1 and pool.num_free_blocks == 1
    check(pool, table, held)


# ---- TTL --------------------------------------------------------------------------------------
def test_ttl_expiry_with_a_fake_clock():
    pool, table, clock, evictions = make(ttl=10)
    finished_turn(pool, table, "t", "old", [1, 2])
    clock.now = 8
    finished_turn(pool, table, "t", "new", [3, 4])
    clock.now = 10
    assert table.expire() == 0                     # idle for exactly the TTL: kept
    clock.now = 15
    assert table.expire() == 1
    assert names(table) == ["new"] and len(evictions) == 1
    assert table.get("t", "new").last_used_monotonic == 15     # get marks it used
    clock.now = 24
    assert table.expire() == 0
    clock.now = 25.5
    assert table.expire() == 1 and table.num_sessions == 0
    check(pool, table)
    assert pool.num_used_blocks == 0 and pool.num_cached_free_blocks == 2


# ---- caps -------------------------------------------------------------------------------------
def test_session_count_cap_evicts_least_recently_used():
    pool, table, clock, evictions = make(max_sessions=2)
    for i in range(3):
        clock.now = i
        finished_turn(pool, table, "t", f"s{i}", [10 * i + 1, 10 * i + 2])
    assert names(table) == ["s1", "s2"] and len(evictions) == 1
    table.get("t", "s1")
    finished_turn(pool, table, "t", "s3", [7, 7])
    assert names(table) == ["s1", "s3"] and len(evictions) == 2


def test_zero_sessions_keeps_nothing():
    pool, table, _, evictions = make(max_sessions=0)
    finished_turn(pool, table, "t", "s", [1, 2])
    assert table.num_sessions == 0 and len(evictions) == 1 and pool.num_used_blocks == 0


def test_pinned_fraction_cap():
    pool, table, clock, evictions = make(num_blocks=10, fraction=0.4)   # 4 blocks may be pinned
    for i in range(3):
        clock.now = i
        finished_turn(pool, table, "t", f"s{i}", [10 * i + 1, 10 * i + 2, 10 * i + 3, 10 * i + 4, 0])
    assert names(table) == ["s1", "s2"] and table.num_pinned_blocks == 4 and len(evictions) == 1
    clock.now = 5
    finished_turn(pool, table, "t", "mid", [1, 2, 3, 4, 5, 6])           # 3 blocks: both others go
    assert names(table) == ["mid"] and table.num_pinned_blocks == 3 and len(evictions) == 3


def test_a_pin_too_big_alone_is_not_kept_and_evicts_nobody():
    pool, table, clock, evictions = make(num_blocks=10, fraction=0.4)
    finished_turn(pool, table, "t", "small", [1, 2])
    big = finished_turn(pool, table, "t", "big", list(range(20, 30)))     # 5 blocks > 4
    assert names(table) == ["small"] and len(evictions) == 1
    assert table.get("t", "big") is None
    assert pool.lookup_prefix(list(range(20, 30)), "t") == big          # still cached, just not pinned
    finished_turn(pool, table, "t", "small", [1, 2] + list(range(40, 50)))   # re-pin grows too big
    assert table.num_sessions == 0 and len(evictions) == 2 and pool.num_used_blocks == 0


def test_blocks_shared_between_pins_count_once():
    pool, table, clock, _ = make(num_blocks=10, fraction=0.4)
    system = [1, 2, 3, 4]
    finished_turn(pool, table, "t", "a", system + [5, 6])
    finished_turn(pool, table, "t", "b", system + [7, 8])               # shares 2 blocks with a
    assert table.num_pinned_blocks == 4 and names(table) == ["a", "b"]
    assert pool.num_used_blocks == table.num_pinned_blocks
    assert sum(s.num_pinned_blocks for s in table.list("t")) == 6


# ---- re-pinning -------------------------------------------------------------------------------
class WatchedPool(BlockPool):
    """Records every block whose reference count reaches zero."""

    def __init__(self, *args):
        super().__init__(*args)
        self.freed: list[int] = []

    def release(self, block_ids):
        super().release(block_ids)
        self.freed += [b for b in block_ids if self.ref_counts[b] == 0]


def test_repinning_a_longer_conversation_keeps_counts_right():
    pool, table, clock, _ = make(pool=WatchedPool(16, BS))
    turn1 = [1, 2, 3, 4]
    first = finished_turn(pool, table, "t", "s", turn1)
    pool.freed.clear()
    turn2 = turn1 + [5, 6, 7, 8, 9]
    blocks = finished_turn(pool, table, "t", "s", turn2)
    assert blocks[:2] == first and len(blocks) == 4
    assert not set(first) & set(pool.freed)        # shared blocks never dropped to zero
    assert [pool.ref_counts[b] for b in blocks] == [1, 1, 1, 1]
    assert table.num_sessions == 1 and table.num_pinned_blocks == 4
    info = table.get("t", "s")
    assert info.num_tokens == 8 and info.num_pinned_blocks == 4 and info.bytes == 80
    assert pool.lookup_prefix(turn2, "t") == blocks
    # the pin is now the only holder: a shorter re-pin frees the dropped tail and nothing else
    pool.freed.clear()
    table.pin("t", "s", turn2[:4], blocks[:2])
    assert sorted(pool.freed) == sorted(blocks[2:])
    assert [pool.ref_counts[b] for b in blocks] == [1, 1, 0, 0]
    assert table.num_pinned_blocks == 2 and table.num_cached_tokens == 4
    check(pool, table)


def test_repeated_prompt_of_whole_blocks_keeps_the_session_chain_findable():
    """The last block of a prompt made of whole blocks is recomputed into a new block (one token
    must be computed), so the pin holds a second copy of that block. The chain must stay findable
    after the first copy is evicted."""
    pool, table, _, _ = make(num_blocks=8)
    tokens = [1, 2, 3, 4]
    first = finished_turn(pool, table, "t", "s", tokens)
    second = finished_turn(pool, table, "t", "s", tokens)
    assert second[0] == first[0] and second[1] != first[1]
    held = pool.allocate(pool.num_free_blocks)          # evicts first[1]
    assert pool.lookup_prefix(tokens, "t") == second
    check(pool, table, held)


# ---- tenants ----------------------------------------------------------------------------------
def test_tenants_cannot_see_or_touch_each_others_sessions():
    pool, table, _, _ = make()
    alice = finished_turn(pool, table, "alice", "shared-name", [1, 2])
    assert table.get("bob", "shared-name") is None
    assert table.release("bob", "shared-name") is False
    assert table.touch("bob", "shared-name") is False
    assert table.list("bob") == []
    bob = finished_turn(pool, table, "bob", "shared-name", [1, 2])     # a different session
    assert set(alice).isdisjoint(bob) and table.num_sessions == 2
    assert table.release("bob", "shared-name") is True
    assert table.get("alice", "shared-name").num_tokens == 2
    assert names(table, "alice") == ["shared-name"] and table.list("bob") == []
    check(pool, table)


# ---- release and info -------------------------------------------------------------------------
def test_release_keeps_blocks_cached_until_evicted():
    pool, table, _, evictions = make(num_blocks=4)
    blocks = finished_turn(pool, table, "t", "s", [1, 2, 3, 4])
    assert table.release("t", "s") is True and table.release("t", "s") is False
    assert not evictions and table.num_evictions == 0
    check(pool, table)
    assert pool.num_used_blocks == 0 and pool.lookup_prefix([1, 2, 3, 4], "t") == blocks
    held = pool.allocate(4)
    assert pool.lookup_prefix([1, 2, 3, 4], "t") == []
    check(pool, table, held)


def test_list_reports_sizes_and_both_clocks():
    pool, table, clock, _ = make()
    clock.now = 42.0
    before = time.time()
    finished_turn(pool, table, "t", "s", [1, 2, 3, 4, 5])
    [info] = table.list("t")
    assert (info.session_id, info.num_tokens, info.num_pinned_blocks, info.bytes) == ("s", 4, 2, 40)
    assert info.last_used_monotonic == 42.0 and before <= info.last_used <= time.time()
    assert table.num_cached_tokens == 4 and table.num_pinned_blocks == 2
