"""The KV-cache manager: the one interface the scheduler has to the cache's blocks.

It owns the block pool (reference counts, chained prefix hashes, the LRU free queue) and the session
table (pins on finished turns), and changes each request's `BlockTable`. The scheduler decides who
runs and how many tokens; it asks the manager to take a cached prefix, to make room for N more
tokens, to give back what a sliding window left behind, to register newly full blocks, to free a
request's blocks or pin them to its session, and it never edits a block table itself.

With a sliding window W a request needs only the blocks its next query's window reaches: blocks
wholly behind it are released while it runs (their table entries become `RELEASED`), and a prefix
hit needs only the cached blocks its own window reaches. Released blocks keep their hashes in the
pool until evicted.

This is where a second, slower tier of cache (host memory, disk) would plug in, and nowhere else:
- a prefix lookup that misses in the pool (`take_cached_prefix`, after the longest in-pool hit)
  would ask the tier for the following blocks by their chained hashes and load the hits into
  freshly allocated blocks;
- an eviction (a cached free block that `allocate` hands out again, or a session pin dropped under
  pressure) would write the block behind to the tier before its rows are overwritten.
The hashes already name a block's content independently of where it lives, so neither the scheduler
nor the runner would change.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from model.cache.block_pool import RELEASED, BlockPool
from model.cache.block_table import BlockTable, held
from model.cache.kv_cache import KVCache
from model.cache.sessions import SessionInfo, SessionTable

__all__ = ["BlockTable", "KVCacheManager", "RELEASED", "SessionInfo", "held"]


class KVCacheManager:
    """Blocks `0..num_blocks-1` of `block_size` tokens, their prefix cache and the sessions' pins.

    Session limits: at most `max_sessions` sessions, idle ones dropped after `idle_ttl_s`, pins holding
    at most `max_pinned_fraction` of the blocks; `on_session_evicted()` is called for each pin dropped
    by a limit, the TTL or cache pressure."""

    def __init__(self, num_blocks: int, block_size: int, window: int | None = None, *, max_sessions: int = 1024,
                 idle_ttl_s: float = 1800.0, max_pinned_fraction: float = 0.5, bytes_per_token: int = 0,
                 on_session_evicted: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.pool = BlockPool(num_blocks, block_size)
        self.sessions = SessionTable(self.pool, max_sessions=max_sessions, idle_ttl_s=idle_ttl_s,
                                     max_pinned_fraction=max_pinned_fraction, bytes_per_token=bytes_per_token,
                                     clock=clock, on_evict=on_session_evicted)
        self.window = window
        self.num_window_released_blocks = 0

    @classmethod
    def for_cache(cls, cache: KVCache, window: int | None = None, **session_limits) -> "KVCacheManager":
        """A manager over the blocks of `cache` it may hand out (its scratch block, if reserved, left out)."""
        return cls(cache.num_allocatable_blocks, cache.block_size, window, bytes_per_token=cache.bytes_per_token,
                   **session_limits)

    # ---- gauges ---------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self.pool.num_blocks * self.pool.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_sessions(self) -> int:
        return self.sessions.num_sessions

    @property
    def session_cached_tokens(self) -> int:
        return self.sessions.num_cached_tokens

    @property
    def num_pinned_blocks(self) -> int:
        return self.sessions.num_pinned_blocks

    # ---- a request's blocks ---------------------------------------------------------------------
    def take_cached_prefix(self, table: BlockTable, token_ids: list[int], tenant: str,
                           session_id: str | None = None) -> int:
        """Give an empty `table` the longest cached run of full blocks of `token_ids` (this tenant's
        only), leaving at least one token to compute so there are logits to sample from; marks the
        request's session used. Returns how many tokens the hit covers (a multiple of the block size)."""
        assert not table.block_ids, "a cached prefix goes into an empty block table"
        if session_id is not None:
            self.sessions.touch(tenant, session_id)
        max_blocks = (len(token_ids) - 1) // self.block_size
        hits = self.pool.lookup_prefix(token_ids, tenant, max_blocks=max_blocks, window=self.window)
        self.pool.acquire(held(hits))
        table.block_ids = list(hits)
        table.num_registered = len(hits)
        return len(hits) * self.block_size

    def allocate(self, table: BlockTable, num_computed_tokens: int, num_new_tokens: int) -> bool:
        """Extend `table` so it covers `num_computed_tokens + num_new_tokens` positions. Under pressure
        session pins are evicted first, least recently used first. False (nothing allocated) when the
        blocks still do not fit: the scheduler then preempts or waits."""
        total = -(-(num_computed_tokens + num_new_tokens) // self.block_size)
        needed = max(0, total - len(table.block_ids))
        if needed == 0:
            return True
        if self.pool.num_free_blocks < needed:
            self.sessions.evict_for_pressure(needed)
        blocks = self.pool.allocate(needed)
        if blocks is None:
            return False
        table.block_ids.extend(blocks)
        return True

    def release_behind_window(self, table: BlockTable, next_position: int) -> int:
        """Give back the registered blocks no query from `next_position` on can see (none without a
        window); their entries become `RELEASED`. Returns how many blocks were released."""
        end = min(BlockPool.first_needed_block(next_position, self.block_size, self.window),
                  table.num_registered, len(table.block_ids))
        behind = held(table.block_ids[:end])
        if behind:
            self.pool.release(behind)
            table.block_ids[:end] = [RELEASED] * end
            self.num_window_released_blocks += len(behind)
        return len(behind)

    def register_full_blocks(self, table: BlockTable, num_computed_tokens: int,
                             token_slice: Callable[[int, int], list[int]], tenant: str) -> None:
        """Give every block whose rows are all computed its chained hash (`token_slice(start, end)`
        returns the request's tokens in that range), so later requests of the same tenant can reuse it."""
        bs = self.block_size
        full = num_computed_tokens // bs
        while len(table.block_hashes) < full:
            i = len(table.block_hashes)
            parent = table.block_hashes[i - 1] if i else None
            table.block_hashes.append(self.pool.hash_block(parent, token_slice(i * bs, (i + 1) * bs), tenant))
        while table.num_registered < min(full, len(table.block_ids)):
            i = table.num_registered
            if table.block_ids[i] != RELEASED:
                self.pool.cache_block(table.block_ids[i], table.block_hashes[i])
            table.num_registered += 1

    def pin_to_session(self, table: BlockTable, tenant: str, session_id: str, token_ids: list[int]) -> None:
        """Hand a finished request's registered blocks to its session's pin (replacing the previous
        turn's); `token_ids` are all its tokens. Nothing to pin: nothing happens. The table keeps its
        own references until `free`."""
        if not table.num_registered:
            return
        num_pinned_tokens = table.num_registered * self.block_size
        self.sessions.pin(tenant, session_id, token_ids[:num_pinned_tokens],
                          held(table.block_ids[:table.num_registered]))

    def free(self, table: BlockTable) -> None:
        """Release every block the table holds (cached ones stay findable until evicted)."""
        self.pool.release(held(table.block_ids))
        table.block_ids = []
        table.num_registered = 0

    # ---- sessions -------------------------------------------------------------------------------
    def list_sessions(self, tenant: str) -> list[SessionInfo]:
        return self.sessions.list(tenant)

    def get_session(self, tenant: str, session_id: str) -> SessionInfo | None:
        return self.sessions.get(tenant, session_id)

    def release_session(self, tenant: str, session_id: str) -> bool:
        return self.sessions.release(tenant, session_id)

    def expire_sessions(self) -> int:
        return self.sessions.expire()

    # ---- invariants -----------------------------------------------------------------------------
    def check_integrity(self, tables: Iterable[BlockTable]) -> None:
        """AssertionError unless the pool is consistent and every block's reference count equals the
        times it appears across `tables` (every live request's) and the session pins."""
        self.pool.check_integrity([t.held() for t in tables] + self.sessions.holders())
