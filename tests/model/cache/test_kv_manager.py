"""The KV manager, the scheduler's one interface to the cache: a request's block table goes through
prefix hit, allocation, window release, registration, session pin and free with the pool's
invariants holding at every step."""
from __future__ import annotations

from model.cache.kv_manager import RELEASED, BlockTable, KVCacheManager

BS = 4


def tokens_of(n: int, first: int = 1) -> list[int]:
    return list(range(first, first + n))


def run_to(kv: KVCacheManager, table: BlockTable, tokens: list[int], tenant: str = "t") -> None:
    """Allocate and compute all of `tokens` in one chunk, registering the full blocks."""
    assert kv.allocate(table, 0, len(tokens))
    kv.register_full_blocks(table, len(tokens), lambda a, b: tokens[a:b], tenant)


def test_a_request_round_trip_leaves_a_findable_prefix_and_no_reference():
    kv = KVCacheManager(8, BS)
    tokens = tokens_of(10)
    first = BlockTable()
    run_to(kv, first, tokens)
    assert len(first.block_ids) == 3 and first.num_registered == 2 and len(first.block_hashes) == 2
    kv.check_integrity([first])
    kv.free(first)
    assert first.block_ids == [] and first.num_registered == 0 and kv.num_used_blocks == 0
    second = BlockTable()
    # 10 tokens: 2 full blocks cached, and at least one token must be left to compute
    assert kv.take_cached_prefix(second, tokens, "t") == 8
    shorter, stranger = BlockTable(), BlockTable()
    assert kv.take_cached_prefix(shorter, tokens[:8], "t") == 4
    assert kv.take_cached_prefix(stranger, tokens, "other tenant") == 0
    assert shorter.block_ids == second.block_ids[:1] and stranger.block_ids == []
    kv.check_integrity([second, shorter, stranger])


def test_allocation_evicts_session_pins_under_pressure_and_fails_without_changing_anything():
    kv = KVCacheManager(4, BS, max_sessions=4, max_pinned_fraction=1.0)
    turn = BlockTable()
    tokens = tokens_of(9)
    run_to(kv, turn, tokens)
    kv.pin_to_session(turn, "t", "s", tokens)
    kv.free(turn)
    assert kv.num_sessions == 1 and kv.num_pinned_blocks == 2 and kv.num_free_blocks == 2
    big = BlockTable()
    assert kv.allocate(big, 0, 16)                    # 4 blocks: the pin has to go
    assert kv.num_sessions == 0 and len(big.block_ids) == 4
    other = BlockTable()
    assert not kv.allocate(other, 0, 1) and other.block_ids == []
    kv.check_integrity([big, other])


def test_blocks_behind_a_window_are_released_once_registered():
    kv = KVCacheManager(16, BS, window=6)
    tokens = tokens_of(20)
    table = BlockTable()
    run_to(kv, table, tokens)
    # the query at 20 sees 14..20: blocks 0..2 (positions 0..11) are behind it
    assert kv.release_behind_window(table, 20) == 3
    assert table.block_ids[:3] == [RELEASED] * 3 and RELEASED not in table.block_ids[3:]
    assert kv.num_window_released_blocks == 3 and kv.release_behind_window(table, 20) == 0
    kv.check_integrity([table])
    kv.free(table)
    assert kv.num_used_blocks == 0


def test_a_session_prefix_lookup_marks_the_session_used():
    now = [0.0]
    kv = KVCacheManager(16, BS, idle_ttl_s=10, clock=lambda: now[0])
    tokens = tokens_of(9)
    turn = BlockTable()
    run_to(kv, turn, tokens)
    kv.pin_to_session(turn, "t", "s", tokens)
    kv.free(turn)
    now[0] = 8.0
    following = BlockTable()
    assert kv.take_cached_prefix(following, tokens + [50, 51], "t", "s") == 8
    now[0] = 15.0                                   # idle 7 s since the lookup, not 15
    assert kv.expire_sessions() == 0 and kv.get_session("t", "s") is not None
    assert [info.session_id for info in kv.list_sessions("t")] == ["s"]
    assert kv.release_session("t", "s") and kv.num_sessions == 0
    kv.free(following)
    kv.check_integrity([])
