"""The session table: a chat session pins the cached blocks of its last finished turn.

The next turn's prompt starts with the whole previous conversation, so the scheduler finds those
blocks through the prefix cache (`BlockPool.lookup_prefix`) and prefills only the new tokens; the
pin's references keep LRU eviction away from them meanwhile. Sessions are keyed by (tenant,
session id): a tenant never sees or touches another tenant's sessions. Pins are dropped on
release, after an idle TTL, when a cap is exceeded (number of sessions, fraction of the pool) and
under cache pressure, least recently used first; running requests hold their own references, so
their blocks are never taken.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from model.block_pool import BlockPool


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    num_tokens: int
    num_pinned_blocks: int
    bytes: int
    last_used: float            # wall-clock seconds since the epoch


@dataclass
class _Session:
    token_ids: list[int]
    block_ids: list[int]
    last_used_monotonic: float
    last_used_wall: float


class SessionTable:
    def __init__(self, pool: BlockPool, max_sessions: int, idle_ttl_s: float, max_pinned_fraction: float,
                 bytes_per_token: int = 0, clock: Callable[[], float] = time.monotonic,
                 on_evict: Callable[[], None] | None = None):
        if max_sessions < 0 or idle_ttl_s <= 0 or not 0.0 <= max_pinned_fraction <= 1.0:
            raise ValueError("sessions: max_sessions >= 0, idle TTL > 0 and pinned fraction in [0, 1]")
        self.pool = pool
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self.max_pinned_blocks = int(max_pinned_fraction * pool.num_blocks)
        self.bytes_per_token = bytes_per_token
        self.clock = clock
        self.on_evict = on_evict
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()   # LRU first
        self.num_evictions = 0

    # ---- gauges ---------------------------------------------------------------------------------
    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def num_pinned_blocks(self) -> int:
        """Pinned block references, summed over sessions (a block shared by two pins counts twice)."""
        return sum(len(s.block_ids) for s in self._sessions.values())

    @property
    def num_cached_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self._sessions.values())

    def holders(self) -> list[list[int]]:
        return [s.block_ids for s in self._sessions.values()]

    # ---- operations -----------------------------------------------------------------------------
    def pin(self, tenant: str, session_id: str, token_ids: list[int], block_ids: list[int]) -> None:
        """Pin a finished turn's full cached blocks, replacing the session's previous pin."""
        key = (tenant, session_id)
        self.pool.acquire(block_ids)                     # before releasing the old pin: shared blocks stay
        old = self._sessions.pop(key, None)
        if old is not None:
            self.pool.release(old.block_ids)
        self._sessions[key] = _Session(list(token_ids), list(block_ids), self.clock(), time.time())
        while len(self._sessions) > self.max_sessions or self.num_pinned_blocks > self.max_pinned_blocks:
            victim = next(iter(self._sessions))
            self._drop(victim, evicted=True)             # the new pin is last: it goes only if alone too big

    def get(self, tenant: str, session_id: str) -> SessionInfo | None:
        session = self._sessions.get((tenant, session_id))
        if session is None:
            return None
        self._touch((tenant, session_id))
        return self._info(session_id, session)

    def touch(self, tenant: str, session_id: str) -> bool:
        if (tenant, session_id) not in self._sessions:
            return False
        self._touch((tenant, session_id))
        return True

    def release(self, tenant: str, session_id: str) -> bool:
        if (tenant, session_id) not in self._sessions:
            return False
        self._drop((tenant, session_id), evicted=False)
        return True

    def list(self, tenant: str) -> list[SessionInfo]:
        return [self._info(sid, s) for (t, sid), s in self._sessions.items() if t == tenant]

    def expire(self) -> int:
        """Drop sessions idle for longer than the TTL; returns how many."""
        now = self.clock()
        stale = [k for k, s in self._sessions.items() if now - s.last_used_monotonic > self.idle_ttl_s]
        for key in stale:
            self._drop(key, evicted=True)
        return len(stale)

    def evict_for_pressure(self, blocks_needed: int) -> int:
        """Drop least recently used pins until `blocks_needed` blocks are free or none are left."""
        evicted = 0
        while self._sessions and self.pool.num_free_blocks < blocks_needed:
            self._drop(next(iter(self._sessions)), evicted=True)
            evicted += 1
        return evicted

    # ---- internals ------------------------------------------------------------------------------
    def _touch(self, key: tuple[str, str]) -> None:
        session = self._sessions[key]
        session.last_used_monotonic = self.clock()
        session.last_used_wall = time.time()
        self._sessions.move_to_end(key)

    def _drop(self, key: tuple[str, str], evicted: bool) -> None:
        session = self._sessions.pop(key)
        self.pool.release(session.block_ids)
        if evicted:
            self.num_evictions += 1
            if self.on_evict is not None:
                self.on_evict()

    def _info(self, session_id: str, session: _Session) -> SessionInfo:
        return SessionInfo(session_id, len(session.token_ids), len(session.block_ids),
                           len(session.token_ids) * self.bytes_per_token, session.last_used_wall)
