"""The KV manager with tiers below its pool (CPU tensors): evicted and pinned blocks are saved with
their rows, a pool miss restores the longest run on disk or in host memory asynchronously, sessions
are listed from pins and disk, and releasing one forgets it everywhere, even mid-turn."""
from __future__ import annotations

import threading

import torch

from model.cache.block_table import BlockTable
from model.cache.disk_tier import DiskTier
from model.cache.fingerprint import ModelFingerprint
from model.cache.host_tier import HostTier
from model.cache.kv_cache import KVCache
from model.cache.kv_manager import KVCacheManager
from model.cache.tiers import CacheTiers
from model.config import preset

BS = 4
CONFIG = preset("custom-llm-tiny")


def make(tmp_path=None, num_blocks: int = 16, host_bytes: int = 0, **limits):
    cache = KVCache(CONFIG, num_blocks, BS)
    for i, layer in enumerate(cache.layers):            # every slot's rows tell which slot and layer they are
        layer.copy_(torch.arange(layer.numel(), dtype=torch.float32).reshape(layer.shape) + 1e5 * i)
    fp = ModelFingerprint("tiny", "weights", str(cache.dtype), BS, CONFIG.cache_row_width, CONFIG.num_layers)
    disk = DiskTier(tmp_path, 1 << 30, fp) if tmp_path is not None else None
    host = HostTier(host_bytes) if host_bytes else None
    tiers = CacheTiers(cache, host, disk) if host is not None or disk is not None else None
    return cache, KVCacheManager.for_cache(cache, tiers=tiers, max_pinned_fraction=1.0, **limits)


def block_rows(cache: KVCache, block: int) -> torch.Tensor:
    return torch.stack([layer[block * BS:(block + 1) * BS] for layer in cache.layers])   # [L, B, W]


def compute(kv: KVCacheManager, table: BlockTable, tokens: list[int], tenant: str = "t") -> None:
    assert kv.allocate(table, 0, len(tokens))
    kv.register_full_blocks(table, len(tokens), lambda a, b: tokens[a:b], tenant)


def take(kv: KVCacheManager, table: BlockTable, tokens: list[int], tenant: str = "t", session=None) -> int:
    """take_cached_prefix, waiting (with a deadline) while it answers None."""
    for _ in range(200):
        got = kv.take_cached_prefix(table, tokens, tenant, session)
        if got is not None:
            return got
        kv.wait_for_restores([table], timeout=0.05)
    raise AssertionError("the restore never finished")


def test_a_pinned_turn_is_saved_and_restored_into_another_pool_with_the_same_rows(tmp_path):
    cache, kv = make(tmp_path)
    tokens = list(range(1, 15))                          # 3 full blocks + 2 tokens
    turn = BlockTable()
    compute(kv, turn, tokens)
    kv.begin_session_turn(turn, "t", "s")
    kv.pin_to_session(turn, "t", "s", tokens)
    saved = [block_rows(cache, b).clone() for b in turn.block_ids[:3]]
    kv.free(turn)
    assert kv.tiers.flush()
    info = kv.get_session("t", "s")
    assert (info.num_pinned_blocks, info.num_disk_blocks, info.cached_tokens, info.num_tokens) == (3, 3, 12, 14)

    cache2, kv2 = make(tmp_path)                         # a restarted process: empty pool, same directory
    [on_disk] = kv2.list_sessions("t")
    assert (on_disk.session_id, on_disk.num_pinned_blocks, on_disk.num_disk_blocks, on_disk.cached_tokens) == \
        ("s", 0, 3, 12)
    following = BlockTable()
    assert kv2.take_cached_prefix(following, tokens + [20, 21], "t", "s") is None     # reading: wait
    assert take(kv2, following, tokens + [20, 21], "t", "s") == 12
    assert following.num_registered == 3
    for block, rows in zip(following.block_ids, saved):
        assert torch.equal(block_rows(cache2, block), rows)
    kv2.check_integrity([following])
    other = BlockTable()
    assert take(kv2, other, tokens, "t") == 12 and other.block_ids == following.block_ids   # now in the pool
    kv.close(), kv2.close()


def test_an_evicted_prefix_block_is_written_before_its_rows_are_reused(tmp_path):
    cache, kv = make(tmp_path, num_blocks=4)
    tokens = list(range(1, 10))
    first = BlockTable()
    compute(kv, first, tokens)
    rows = [block_rows(cache, b).clone() for b in first.block_ids[:2]]
    kv.free(first)                                       # cached, free
    assert not kv.tiers.holds(first.block_hashes[0])
    big = BlockTable()
    assert kv.allocate(big, 0, 16)                       # all 4 blocks: the cached two are evicted
    for layer in cache.layers:
        layer.zero_()                                    # the step overwrites them
    assert kv.tiers.flush() and kv.tiers.holds(first.block_hashes[0]) and kv.tiers.holds(first.block_hashes[1])
    for h, expected in zip(first.block_hashes, rows):
        assert torch.equal(kv.tiers.disk.read(h), expected)
    kv.close()


def test_a_restore_stops_at_the_first_block_missing_from_disk(tmp_path):
    cache, kv = make(tmp_path)
    tokens = list(range(1, 18))                          # 4 full blocks
    turn = BlockTable()
    compute(kv, turn, tokens)
    kv.pin_to_session(turn, "t", "s", tokens)
    kv.free(turn)
    kv.tiers.flush()
    kv.tiers.disk._remove(kv.tiers.disk.block_path(turn.block_hashes[2]))
    cache2, kv2 = make(tmp_path)
    table = BlockTable()
    assert take(kv2, table, tokens, "t") == 2 * BS
    assert kv2.take_cached_prefix(BlockTable(), [99] * 9, "t") == 0     # nothing on disk: no wait at all
    kv.close(), kv2.close()


def test_the_host_tier_restores_without_a_disk_and_is_bounded():
    block_bytes = CONFIG.num_layers * BS * CONFIG.cache_row_width * 4
    tokens = list(range(1, 18))                          # 4 full blocks
    for room, restored in ((4, 4 * BS), (3, 0)):         # with room for 3, block 0 went first: a miss
        cache, kv = make(host_bytes=room * block_bytes)
        turn = BlockTable()
        compute(kv, turn, tokens)
        kv.pin_to_session(turn, "t", "s", tokens)
        saved = [block_rows(cache, b).clone() for b in turn.block_ids[:4]]
        blocks = list(turn.block_ids)
        kv.free(turn)
        assert len(kv.tiers.host) == min(room, 4) and kv.tiers.bytes_used("host") == min(room, 4) * block_bytes
        kv.sessions.release("t", "s")
        assert kv.pool.forget(blocks) == 4               # gone from the pool, not from host memory
        for layer in cache.layers:
            layer.zero_()
        table = BlockTable()
        assert take(kv, table, tokens, "t") == restored
        for block, rows in zip(table.block_ids, saved):
            assert torch.equal(block_rows(cache, block), rows)
        kv.free(table)
        kv.check_integrity([])
        kv.close()


def test_a_restore_in_flight_lets_the_caller_go_on_and_is_cancelled_by_free(tmp_path, monkeypatch):
    cache, kv = make(tmp_path)
    tokens = list(range(1, 14))
    turn = BlockTable()
    compute(kv, turn, tokens)
    kv.pin_to_session(turn, "t", "s", tokens)
    kv.free(turn)
    kv.tiers.flush()
    cache2, kv2 = make(tmp_path)
    gate, entered = threading.Event(), threading.Event()
    read = kv2.tiers.disk.read

    def slow_read(h):
        entered.set()
        gate.wait(30)
        return read(h)
    monkeypatch.setattr(kv2.tiers.disk, "read", slow_read)
    waiting = BlockTable()
    assert kv2.take_cached_prefix(waiting, tokens, "t") is None
    assert entered.wait(30)
    kv2.wait_for_restores([waiting], timeout=0.01)       # returns although nothing finished
    busy = BlockTable()                                  # meanwhile other requests are served
    compute(kv2, busy, list(range(50, 59)))
    assert kv2.take_cached_prefix(waiting, tokens, "t") is None
    ticket = waiting.restore
    kv2.free(waiting)                                    # aborted while reading
    gate.set()
    assert ticket.cancelled and ticket.done.wait(30) and len(ticket.rows) <= 1
    assert waiting.restore is None and waiting.block_ids == []
    kv2.check_integrity([busy])
    kv.close(), kv2.close()


def test_release_forgets_the_session_in_pool_and_on_disk_but_keeps_what_others_hold(tmp_path):
    cache, kv = make(tmp_path)
    shared = list(range(1, 9))                           # 2 blocks both sessions share
    a_tokens, b_tokens = shared + [10, 11, 12, 13, 14], shared + [20, 21, 22, 23, 24]
    for sid, tokens in (("a", a_tokens), ("b", b_tokens)):
        table = BlockTable()
        assert take(kv, table, tokens, "t") in (0, 8)
        assert kv.allocate(table, len(table.block_ids) * BS, len(tokens) - len(table.block_ids) * BS)
        kv.register_full_blocks(table, len(tokens), lambda x, y, tokens=tokens: tokens[x:y], "t")
        kv.pin_to_session(table, "t", sid, tokens)
        kv.free(table)
    kv.tiers.flush()
    a_blocks = kv.sessions.blocks_of("t", "a")
    a_hashes = [kv.pool.block_hash_of(b) for b in a_blocks]
    assert kv.release_session("t", "a") and kv.tiers.flush()
    assert kv.get_session("t", "a") is None and [s.session_id for s in kv.list_sessions("t")] == ["b"]
    assert kv.pool.block_hash_of(a_blocks[2]) is None                  # a's own block: forgotten
    assert kv.pool.block_hash_of(a_blocks[0]) == a_hashes[0]           # shared with b's pin: kept
    assert not kv.tiers.disk.probe(a_hashes[2]) and kv.tiers.disk.probe(a_hashes[0])
    assert kv.release_session("t", "a") is False
    kv.check_integrity([])
    kv.close()


def test_a_release_during_a_turn_is_not_undone_when_the_turn_ends(tmp_path):
    cache, kv = make(tmp_path)
    tokens = list(range(1, 10))
    for release_mid_turn in (False, True):
        table = BlockTable()
        kv.begin_session_turn(table, "t", "s")
        compute(kv, table, tokens)
        if release_mid_turn:
            assert kv.release_session("t", "s")          # the first turn's pin, and this turn is marked
        kv.pin_to_session(table, "t", "s", tokens)
        kv.free(table)
    assert kv.get_session("t", "s") is None and kv.num_sessions == 0 and not kv.sessions._turns
    kv.tiers.flush()
    assert kv.tiers.session("t", "s") is None
    later = BlockTable()                                 # a turn begun after the release pins again
    kv.begin_session_turn(later, "t", "s")
    compute(kv, later, tokens)
    kv.pin_to_session(later, "t", "s", tokens)
    kv.free(later)
    assert kv.get_session("t", "s") is not None
    kv.close()


def test_a_turn_too_short_to_fill_a_block_is_listed_with_nothing_cached():
    cache, kv = make()                                   # (no tier: the same with one)
    table = BlockTable()
    kv.begin_session_turn(table, "t", "short")
    compute(kv, table, [1, 2, 3])
    kv.pin_to_session(table, "t", "short", [1, 2, 3])
    kv.free(table)
    info = kv.get_session("t", "short")
    assert (info.num_tokens, info.cached_tokens, info.num_pinned_blocks, info.num_disk_blocks) == (3, 0, 0, 0)
    assert kv.release_session("t", "short") and kv.get_session("t", "short") is None
    kv.close()
