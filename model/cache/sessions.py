"""The session table: a chat session pins the cached blocks of its last finished turn.

The next turn's prompt starts with the whole previous conversation, so the scheduler finds those
blocks through the prefix cache (`BlockPool.lookup_prefix`) and prefills only the new tokens; the
pin's references keep LRU eviction away from them meanwhile. Sessions are keyed by (tenant,
session id): a tenant never sees or touches another tenant's sessions. Pins are dropped on
release, after an idle TTL, when a cap is exceeded (number of sessions, fraction of the pool) and
under cache pressure, least recently used first; running requests hold their own references, so
their blocks are never taken.

A turn in flight is counted (`begin_turn` when its request is queued, `end_turn` when it finishes):
a release while turns of the session are in flight marks them, so that none of them pins the
session again when it ends — a deleted session stays deleted.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from model.cache.block_pool import BlockPool


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    num_tokens: int
    num_pinned_blocks: int
    bytes: int
    last_used: float                # wall-clock seconds since the epoch (time.time())
    last_used_monotonic: float      # the table's clock, which the idle TTL is measured with
    cached_tokens: int = 0          # tokens whose cache is kept (pinned blocks, or blocks on disk)
    num_disk_blocks: int = 0        # of its blocks, those on disk (a slower tier), when there is one


@dataclass(frozen=True)
class SessionTurn:
    """A request of a session in flight, and how many releases of the session it had seen."""
    key: tuple[str, str]
    releases_seen: int


@dataclass
class _Session:
    num_tokens: int
    block_ids: list[int]
    last_used_monotonic: float
    last_used_wall: float


class SessionTable:
    """Pins per (tenant, session id), kept in LRU order (least recently used first).

    Caps: at most `max_sessions` sessions, and at most `int(max_pinned_fraction * pool.num_blocks)`
    distinct pinned blocks (a block shared by two sessions' pins, e.g. a common system prompt,
    counts once: that is what the pins actually keep out of the free queue).
    """

    def __init__(self, pool: BlockPool, max_sessions: int, idle_ttl_s: float, max_pinned_fraction: float,
                 bytes_per_token: int = 0, clock: Callable[[], float] = time.monotonic,
                 on_evict: Callable[[], None] | None = None):
        if max_sessions < 0 or idle_ttl_s <= 0 or not 0.0 <= max_pinned_fraction <= 1.0 or bytes_per_token < 0:
            raise ValueError("sessions: max_sessions >= 0, idle TTL > 0, pinned fraction in [0, 1] "
                             "and bytes per token >= 0")
        self.pool = pool
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self.max_pinned_blocks = int(max_pinned_fraction * pool.num_blocks)
        self.bytes_per_token = bytes_per_token
        self.clock = clock
        self.on_evict = on_evict
        self.num_evictions = 0
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()   # LRU first
        self._pins_per_block: dict[int, int] = {}                               # block → pins holding it
        self._turns: dict[tuple[str, str], list[int]] = {}       # key → [turns in flight, releases since]

    # ---- gauges ---------------------------------------------------------------------------------
    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by at least one pin."""
        return len(self._pins_per_block)

    @property
    def num_cached_tokens(self) -> int:
        """Tokens whose cache the pins hold (whole blocks)."""
        return sum(len(s.block_ids) for s in self._sessions.values()) * self.pool.block_size

    def holders(self) -> list[list[int]]:
        """One block list per pin, for `BlockPool.check_integrity`."""
        return [list(s.block_ids) for s in self._sessions.values()]

    # ---- operations -----------------------------------------------------------------------------
    def pin(self, tenant: str, session_id: str, token_ids: list[int], block_ids: list[int]) -> None:
        """Pin a finished turn's full cached blocks (`block_ids` cover the first
        `len(block_ids) * block_size` of `token_ids`), replacing the session's previous pin.

        The new references are taken before the old pin is released, so blocks the two turns share
        never reach zero. Then the caps are enforced: if the new pin alone breaks them it is not
        kept (an eviction); otherwise least recently used other sessions are evicted until both hold.
        """
        assert len(block_ids) * self.pool.block_size <= len(token_ids), "a pin covers more blocks than tokens"
        key = (tenant, session_id)
        blocks = list(block_ids)
        self.pool.acquire(blocks)
        self._count_pins(blocks, +1)
        old = self._sessions.pop(key, None)
        if old is not None:
            self._unpin(old)
        self._sessions[key] = _Session(len(token_ids), blocks, self.clock(), time.time())
        if self.max_sessions == 0 or len(set(blocks)) > self.max_pinned_blocks:
            self._drop(key, evicted=True)
            return
        while len(self._sessions) > self.max_sessions or self.num_pinned_blocks > self.max_pinned_blocks:
            self._drop(next(iter(self._sessions)), evicted=True)

    def get(self, tenant: str, session_id: str) -> SessionInfo | None:
        """This tenant's session, marked as used now; None if there is none."""
        if not self.touch(tenant, session_id):
            return None
        return self._info(session_id, self._sessions[(tenant, session_id)])

    def touch(self, tenant: str, session_id: str) -> bool:
        """Mark a session as used now (moves it to the back of the eviction order)."""
        key = (tenant, session_id)
        session = self._sessions.get(key)
        if session is None:
            return False
        session.last_used_monotonic = self.clock()
        session.last_used_wall = time.time()
        self._sessions.move_to_end(key)
        return True

    def release(self, tenant: str, session_id: str) -> bool:
        """Drop this tenant's session; its blocks stay in the prefix cache until evicted. Turns of it
        in flight will not pin it again. False if there was neither a pin nor a turn in flight."""
        key = (tenant, session_id)
        turns = self._turns.get(key)
        if turns is not None:
            turns[1] += 1
        if key not in self._sessions:
            return turns is not None
        self._drop(key, evicted=False)
        return True

    def begin_turn(self, tenant: str, session_id: str) -> SessionTurn:
        """A request of this session was queued."""
        turns = self._turns.setdefault((tenant, session_id), [0, 0])
        turns[0] += 1
        return SessionTurn((tenant, session_id), turns[1])

    def end_turn(self, turn: SessionTurn) -> bool:
        """The request finished: True unless the session was released since it began (then it must
        not be pinned again)."""
        turns = self._turns[turn.key]
        turns[0] -= 1
        if not turns[0]:
            del self._turns[turn.key]
        return turns[1] == turn.releases_seen

    def blocks_of(self, tenant: str, session_id: str) -> list[int] | None:
        """The blocks a session's pin holds (None without a pin); does not mark it used."""
        session = self._sessions.get((tenant, session_id))
        return list(session.block_ids) if session is not None else None

    def list(self, tenant: str) -> list[SessionInfo]:
        """This tenant's sessions, least recently used first (does not mark them used)."""
        return [self._info(sid, s) for (t, sid), s in self._sessions.items() if t == tenant]

    def expire(self) -> int:
        """Drop sessions idle for longer than the TTL (by `clock`); returns how many."""
        now = self.clock()
        stale = [k for k, s in self._sessions.items() if now - s.last_used_monotonic > self.idle_ttl_s]
        for key in stale:
            self._drop(key, evicted=True)
        return len(stale)

    def evict_for_pressure(self, blocks_needed: int) -> int:
        """Drop least recently used pins, one session at a time, until `blocks_needed` blocks are
        free or no session is left; returns how many were dropped. A dropped pin frees only the
        blocks nothing else holds (running requests and other pins keep theirs)."""
        evicted = 0
        while self._sessions and self.pool.num_free_blocks < blocks_needed:
            self._drop(next(iter(self._sessions)), evicted=True)
            evicted += 1
        return evicted

    # ---- internals ------------------------------------------------------------------------------
    def _count_pins(self, blocks: list[int], delta: int) -> None:
        for block in blocks:
            count = self._pins_per_block.get(block, 0) + delta
            if count:
                self._pins_per_block[block] = count
            else:
                del self._pins_per_block[block]

    def _unpin(self, session: _Session) -> None:
        self._count_pins(session.block_ids, -1)
        self.pool.release(session.block_ids)

    def _drop(self, key: tuple[str, str], evicted: bool) -> None:
        self._unpin(self._sessions.pop(key))
        if evicted:
            self.num_evictions += 1
            if self.on_evict is not None:
                self.on_evict()

    def _info(self, session_id: str, session: _Session) -> SessionInfo:
        # bytes the pin holds: its blocks (with a sliding window, fewer than its tokens need)
        held_bytes = len(session.block_ids) * self.pool.block_size * self.bytes_per_token
        return SessionInfo(session_id, session.num_tokens, len(session.block_ids), held_bytes, session.last_used_wall,
                           session.last_used_monotonic, len(session.block_ids) * self.pool.block_size)
