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

Slower tiers (host memory, disk: `model/cache/tiers.py`) plug in here and nowhere else:
- a prefix lookup that misses in the pool (`take_cached_prefix`, after the longest in-pool hit) asks
  the tiers for the following blocks by their chained hashes; while they are read the call answers
  None and the request waits (other requests keep running); the next call, once the read is done,
  loads the run found into freshly allocated blocks and computes only the rest;
- a cached block that `allocate` evicts is saved to the tiers before its rows are overwritten, and a
  finished turn's pinned blocks are saved with the session's manifest (`pin_to_session`);
- session queries merge the pins with the sessions on disk (after a restart, or from another
  replica sharing the directory), and releasing a session forgets its blocks in every tier.
The hashes name a block's content independently of where it lives, so neither the scheduler nor the
runner knows about tiers. Models with a sliding window use no tier.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable

from model.cache.block_pool import RELEASED, BlockPool
from model.cache.block_table import BlockTable, held
from model.cache.kv_cache import KVCache
from model.cache.sessions import SessionInfo, SessionTable
from model.cache.tiers import CacheTiers

__all__ = ["BlockTable", "KVCacheManager", "RELEASED", "SessionInfo", "held"]


class KVCacheManager:
    """Blocks `0..num_blocks-1` of `block_size` tokens, their prefix cache and the sessions' pins.

    Session limits: at most `max_sessions` sessions, idle ones dropped after `idle_ttl_s`, pins holding
    at most `max_pinned_fraction` of the blocks; `on_session_evicted()` is called for each pin dropped
    by a limit, the TTL or cache pressure."""

    def __init__(self, num_blocks: int, block_size: int, window: int | None = None, *, max_sessions: int = 1024,
                 idle_ttl_s: float = 1800.0, max_pinned_fraction: float = 0.5, bytes_per_token: int = 0,
                 on_session_evicted: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 tiers: CacheTiers | None = None):
        self.pool = BlockPool(num_blocks, block_size)
        self.sessions = SessionTable(self.pool, max_sessions=max_sessions, idle_ttl_s=idle_ttl_s,
                                     max_pinned_fraction=max_pinned_fraction, bytes_per_token=bytes_per_token,
                                     clock=clock, on_evict=on_session_evicted)
        self.window = window
        self.num_window_released_blocks = 0
        assert tiers is None or window is None, "tiers serve models without a sliding window"
        self.tiers = tiers
        if tiers is not None:
            self.pool.evicted = []

    @classmethod
    def for_cache(cls, cache: KVCache, window: int | None = None, tiers: CacheTiers | None = None,
                  **session_limits) -> "KVCacheManager":
        """A manager over the blocks of `cache` it may hand out (its scratch block, if reserved, left out)."""
        return cls(cache.num_allocatable_blocks, cache.block_size, window, bytes_per_token=cache.bytes_per_token,
                   tiers=tiers, **session_limits)

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
                           session_id: str | None = None) -> int | None:
        """Give an empty `table` the longest cached run of full blocks of `token_ids` (this tenant's
        only), leaving at least one token to compute so there are logits to sample from; marks the
        request's session used. Returns how many tokens the hit covers (a multiple of the block size),
        or None while a slower tier reads the blocks that follow the pool's hit: call again later."""
        assert not table.block_ids, "a cached prefix goes into an empty block table"
        ticket, table.restore = table.restore, None
        if ticket is not None and not ticket.done.is_set():
            table.restore = ticket
            return None
        if session_id is not None:
            self.sessions.touch(tenant, session_id)
        max_blocks = (len(token_ids) - 1) // self.block_size
        hits = self.pool.lookup_prefix(token_ids, tenant, max_blocks=max_blocks, window=self.window)
        if self.tiers is not None and ticket is None and len(hits) < max_blocks:
            hashes = self.pool.hash_prefix_blocks(token_ids[:max_blocks * self.block_size], tenant)
            table.restore = self.tiers.start_restore(hashes[len(hits):], len(hits))
            if table.restore is not None:
                return None
        self.pool.acquire(held(hits))
        table.block_ids = list(hits)
        table.num_registered = len(hits)
        if ticket is not None:
            self._install(table, *ticket.run_from(len(hits)))
        return len(table.block_ids) * self.block_size

    def _install(self, table: BlockTable, hashes: list[bytes], rows: list) -> None:
        """Append restored blocks to `table` (as many as free blocks allow), registered under their hashes."""
        if not rows:
            return
        if self.pool.num_free_blocks < len(rows):
            self.sessions.evict_for_pressure(len(rows))
        blocks = self.pool.allocate(min(len(rows), self.pool.num_free_blocks))
        self._save_evicted()
        if not blocks:
            return
        self.tiers.install(blocks, rows[:len(blocks)])
        for block, block_hash in zip(blocks, hashes):
            self.pool.cache_block(block, block_hash)
        table.block_ids.extend(blocks)
        table.num_registered += len(blocks)

    def wait_for_restores(self, tables: Iterable[BlockTable], timeout: float) -> None:
        """Block until a restore of one of these tables is done, or `timeout` seconds."""
        tickets = [t.restore for t in tables if t.restore is not None]
        if tickets and self.tiers is not None:
            self.tiers.wait(tickets, timeout)

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
        self._save_evicted()
        table.block_ids.extend(blocks)
        return True

    def _save_evicted(self) -> None:
        """Save the cached blocks the last allocation evicted to the tiers (their rows are intact
        until the step that follows)."""
        if self.pool.evicted:
            evicted, self.pool.evicted = self.pool.evicted, []
            self.tiers.save([block for block, _ in evicted], [block_hash for _, block_hash in evicted])

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

    def begin_session_turn(self, table: BlockTable, tenant: str, session_id: str) -> None:
        """A request of a session was queued: until it is pinned, a release of the session marks it."""
        table.session_turn = self.sessions.begin_turn(tenant, session_id)

    def pin_to_session(self, table: BlockTable, tenant: str, session_id: str, token_ids: list[int]) -> None:
        """Hand a finished request's registered blocks to its session's pin (replacing the previous
        turn's; a turn too short to fill a block pins none but is listed); `token_ids` are all its
        tokens. Nothing happens when the session was released while this turn ran. With tiers, the
        blocks and the session's manifest are saved. The table keeps its own references until `free`."""
        turn, table.session_turn = table.session_turn, None
        if turn is not None and not self.sessions.end_turn(turn):
            return
        num = table.num_registered
        blocks = held(table.block_ids[:num])
        self.sessions.pin(tenant, session_id, token_ids, blocks)
        if self.tiers is not None and num and self.sessions.max_sessions:
            self.tiers.save(blocks, table.block_hashes[:num])
            self.tiers.write_session(tenant, session_id, len(token_ids), table.block_hashes[:num])

    def free(self, table: BlockTable) -> None:
        """Release every block the table holds (cached ones stay findable until evicted)."""
        self.pool.release(held(table.block_ids))
        table.block_ids = []
        table.num_registered = 0
        if table.restore is not None:
            table.restore.cancelled = True
            table.restore = None

    # ---- sessions -------------------------------------------------------------------------------
    def list_sessions(self, tenant: str) -> list[SessionInfo]:
        """This tenant's sessions: those only on disk (least recently used first), then the pinned."""
        pinned = self.sessions.list(tenant)
        if self.tiers is None:
            return pinned
        names = {info.session_id for info in pinned}
        on_disk = [self._disk_info(m.session_id, m.num_tokens, list(m.block_hashes), m.last_used)
                   for m in self.tiers.sessions(tenant) if m.session_id not in names]
        return on_disk + [self._with_disk(tenant, info) for info in pinned]

    def get_session(self, tenant: str, session_id: str) -> SessionInfo | None:
        info = self.sessions.get(tenant, session_id)
        if self.tiers is None or info is not None:
            return info if self.tiers is None else self._with_disk(tenant, info, probe=True)
        m = self.tiers.session(tenant, session_id)
        return None if m is None else self._disk_info(session_id, m.num_tokens, list(m.block_hashes), m.last_used,
                                                      probe=True)

    def release_session(self, tenant: str, session_id: str) -> bool:
        """Drop a session: its pin, the cached prefix of its blocks nothing else holds, its copies in
        the tiers; a turn of it in flight will not pin it again. False if it was nowhere."""
        blocks = self.sessions.blocks_of(tenant, session_id) or []
        hashes = [h for h in map(self.pool.block_hash_of, blocks) if h is not None]
        released = self.sessions.release(tenant, session_id)
        self.pool.forget(blocks)
        if self.tiers is not None:
            keep = {self.pool.block_hash_of(b) for b in blocks if self.pool.ref_counts[b]}
            released = self.tiers.forget(tenant, session_id, hashes, keep) or released
        return released

    def _with_disk(self, tenant: str, info: SessionInfo, probe: bool = False) -> SessionInfo:
        hashes = []
        for block_hash in map(self.pool.block_hash_of, self.sessions.blocks_of(tenant, info.session_id) or []):
            if block_hash is None:
                break
            hashes.append(block_hash)
        on_disk = self.tiers.blocks_on_disk(hashes, probe)
        return dataclasses.replace(info, num_disk_blocks=on_disk,
                                   cached_tokens=max(info.cached_tokens, on_disk * self.block_size))

    def _disk_info(self, session_id: str, num_tokens: int, hashes: list[bytes], last_used: float,
                   probe: bool = False) -> SessionInfo:
        on_disk = self.tiers.blocks_on_disk(hashes, probe)
        return SessionInfo(session_id, num_tokens, 0, 0, last_used, float("nan"), on_disk * self.block_size, on_disk)

    def expire_sessions(self) -> int:
        return self.sessions.expire()

    def tier_bytes_used(self, tier: str) -> int:
        return self.tiers.bytes_used(tier) if self.tiers is not None else 0

    def close(self) -> None:
        """Write what the tiers still hold queued, then stop their threads."""
        if self.tiers is not None:
            self.tiers.close()

    # ---- invariants -----------------------------------------------------------------------------
    def check_integrity(self, tables: Iterable[BlockTable]) -> None:
        """AssertionError unless the pool is consistent and every block's reference count equals the
        times it appears across `tables` (every live request's) and the session pins."""
        self.pool.check_integrity([t.held() for t in tables] + self.sessions.holders())
