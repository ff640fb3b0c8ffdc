"""One request's view of the cache: its block table, the chained hashes of its full blocks, and how
many of its blocks are registered in the prefix cache.

The KV manager (`model.cache.kv_manager`) creates and changes it; everything else only reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.cache.block_pool import RELEASED

if TYPE_CHECKING:
    from model.cache.sessions import SessionTurn
    from model.cache.tiers import RestoreTicket


@dataclass
class BlockTable:
    """`block_ids[i]` holds the rows of positions `i*B .. (i+1)*B - 1`, or is `RELEASED` when that
    block was given back behind a sliding window (or was never needed by a windowed prefix hit).

    `block_hashes[i]` is the chained hash of full block i; it depends only on the tokens, so it
    survives a preemption (the table's blocks are freed, the hashes are not recomputed).
    `block_ids[:num_registered]` carry their hash in the pool (the ones not `RELEASED`).

    `restore` is the read of the request's next blocks from a slower tier while the request waits;
    `session_turn` marks a request of a session in flight (see `SessionTable.begin_turn`)."""

    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0
    restore: "RestoreTicket | None" = None
    session_turn: "SessionTurn | None" = None

    def held(self) -> list[int]:
        """The blocks this table actually holds a reference on."""
        return held(self.block_ids)


def held(block_ids: list[int]) -> list[int]:
    """The blocks of a table that are held (entries released behind a window left out)."""
    return [b for b in block_ids if b != RELEASED]
