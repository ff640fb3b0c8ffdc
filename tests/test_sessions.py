"""Session pins: survive pressure until their turn (LRU first), TTL, caps, tenants, release."""
from __future__ import annotations

from model.block_pool import BlockPool
from model.sessions import SessionTable


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(num_blocks=16, max_sessions=8, ttl=100.0, fraction=1.0):
    pool = BlockPool(num_blocks, 2)
    clock = FakeClock()
    evictions = []
    table = SessionTable(pool, max_sessions, ttl, fraction, bytes_per_token=10, clock=clock,
                         on_evict=lambda: evictions.append(1))
    return pool, table, clock, evictions


def finished_turn(pool, table, tenant, session, tokens):
    """A request finished: it reused the cached prefix, computed the rest, its full blocks go to the
    session pin, then the request releases all it held."""
    hits = pool.lookup_prefix(tokens, tenant)
    pool.acquire(hits)
    rest = pool.allocate(-(-len(tokens) // pool.block_size) - len(hits))
    blocks = hits + rest
    for block, block_hash in list(zip(blocks, pool.hash_prefix_blocks(tokens, tenant)))[len(hits):]:
        pool.cache_block(block, block_hash)
    full = len(tokens) // pool.block_size
    table.pin(tenant, session, tokens[: full * pool.block_size], blocks[:full])
    pool.release(blocks)
    return blocks[:full]


def test_pins_survive_allocation_pressure_until_evicted_lru_first():
    pool, table, clock, evictions = make(num_blocks=8)
    first = finished_turn(pool, table, "t", "s1", [1, 2, 3, 4])
    clock.now = 1
    second = finished_turn(pool, table, "t", "s2", [5, 6, 7, 8])
    pool.check_integrity(table.holders())
    other = pool.allocate(4)               # uses the 4 unpinned blocks; pins stay
    assert pool.allocate(1) is None
    assert pool.lookup_prefix([1, 2, 3, 4], "t") == first and pool.lookup_prefix([5, 6, 7, 8], "t") == second
    assert table.evict_for_pressure(2) == 1
    assert table.get("t", "s1") is None and table.get("t", "s2") is not None   # least recently used went first
    assert len(evictions) == 1
    pool.check_integrity([other] + table.holders())


def test_ttl_expiry():
    pool, table, clock, _ = make(ttl=10)
    finished_turn(pool, table, "t", "old", [1, 2])
    clock.now = 8
    finished_turn(pool, table, "t", "new", [3, 4])
    clock.now = 15
    assert table.expire() == 1
    assert [s.session_id for s in table.list("t")] == ["new"]
    pool.check_integrity(table.holders())


def test_session_count_and_pinned_fraction_caps():
    pool, table, clock, evictions = make(num_blocks=10, max_sessions=2, fraction=0.4)
    for i in range(3):
        clock.now = i
        finished_turn(pool, table, "t", f"s{i}", [10 * i + 1, 10 * i + 2])
    assert [s.session_id for s in table.list("t")] == ["s1", "s2"]
    clock.now = 5
    finished_turn(pool, table, "t", "big", [1, 2, 3, 4, 5, 6])   # 3 blocks: the 4-block cap drops the others
    assert table.num_pinned_blocks <= 4 and table.get("t", "big") is not None
    assert len(evictions) >= 2
    pool.check_integrity(table.holders())


def test_repinning_a_longer_conversation_keeps_counts_right():
    pool, table, clock, _ = make()
    finished_turn(pool, table, "t", "s", [1, 2, 3, 4])
    blocks = finished_turn(pool, table, "t", "s", [1, 2, 3, 4, 5, 6, 7, 8])
    assert table.num_sessions == 1 and table.num_pinned_blocks == 4
    assert table.get("t", "s").num_tokens == 8 and table.get("t", "s").bytes == 80
    pool.check_integrity(table.holders())
    assert pool.lookup_prefix([1, 2, 3, 4, 5, 6, 7, 8], "t") == blocks


def test_tenants_cannot_see_or_touch_each_others_sessions():
    pool, table, _, _ = make()
    finished_turn(pool, table, "alice", "shared-name", [1, 2])
    assert table.get("bob", "shared-name") is None
    assert table.release("bob", "shared-name") is False
    assert table.list("bob") == []
    assert table.get("alice", "shared-name") is not None


def test_release_keeps_blocks_cached_until_evicted():
    pool, table, _, _ = make()
    blocks = finished_turn(pool, table, "t", "s", [1, 2, 3, 4])
    assert table.release("t", "s") is True
    pool.check_integrity(table.holders())
    assert pool.num_used_blocks == 0 and pool.lookup_prefix([1, 2, 3, 4], "t") == blocks
