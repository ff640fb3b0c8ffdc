"""The KV-cache block pool: plain Python over block ids, no tensors.

Every block has a reference count (how many requests and session pins hold it) and, once full,
a content hash chained from the previous block's hash, its token ids and a salt (the tenant), so
identical prefixes of one tenant share blocks and different tenants never do.

Blocks with no reference wait in a free queue in LRU order, whether they still hold a cached
prefix or not. Allocation takes the least recently freed block first and evicts its hash; a prefix
hit on a waiting block takes it out of the queue in O(1) (an OrderedDict keyed by block id).
Running out of blocks is not an error: `allocate` returns None and the scheduler preempts.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterable, Sequence


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the block pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}                      # hash → block id
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.num_evictions = 0

    # ---- hashing --------------------------------------------------------------------------------
    @staticmethod
    def hash_block(parent: bytes | None, token_ids: Sequence[int], salt: str) -> bytes:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(parent or b"root")
        digest.update(salt.encode("utf-8"))
        digest.update(b"\x00")
        digest.update(b"".join(int(t).to_bytes(4, "little", signed=False) for t in token_ids))
        return digest.digest()

    def hash_prefix_blocks(self, token_ids: Sequence[int], salt: str) -> list[bytes]:
        """Chained hashes of every full block of `token_ids`."""
        hashes: list[bytes] = []
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            hashes.append(self.hash_block(hashes[-1] if hashes else None,
                                          token_ids[start:start + self.block_size], salt))
        return hashes

    # ---- gauges ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached_free_blocks(self) -> int:
        return sum(1 for b in self.free_queue if self.block_hashes[b] is not None)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    # ---- operations -----------------------------------------------------------------------------
    def lookup_prefix(self, token_ids: Sequence[int], salt: str, max_blocks: int | None = None) -> list[int]:
        """Blocks of the longest cached chain of full blocks of `token_ids` for this salt.
        Reference counts are not changed (call `acquire`)."""
        limit = len(token_ids) // self.block_size
        if max_blocks is not None:
            limit = min(limit, max_blocks)
        hits: list[int] = []
        parent = None
        for i in range(limit):
            parent = self.hash_block(parent, token_ids[i * self.block_size:(i + 1) * self.block_size], salt)
            block = self.cached.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def acquire(self, block_ids: Iterable[int]) -> None:
        for block in block_ids:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks with one reference each, or None (nothing changed) if too few are free."""
        if count > len(self.free_queue):
            return None
        blocks = []
        for _ in range(count):
            block, _ = self.free_queue.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue's tail in
        reverse order, so a sequence's last blocks are evicted before its prefix."""
        for block in reversed(block_ids):
            assert self.ref_counts[block] > 0, f"block {block} released more often than acquired"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Make a full block findable by its hash (the first block with a given hash keeps it)."""
        if self.block_hashes[block_id] is not None or block_hash in self.cached:
            return
        self.block_hashes[block_id] = block_hash
        self.cached[block_hash] = block_id

    def block_hash_of(self, block_id: int) -> bytes | None:
        return self.block_hashes[block_id]

    def _evict(self, block: int) -> None:
        block_hash = self.block_hashes[block]
        if block_hash is not None:
            del self.cached[block_hash]
            self.block_hashes[block] = None
            self.num_evictions += 1

    def reset_prefix_cache(self) -> None:
        for block in list(self.free_queue):
            self._evict(block)

    # ---- invariants -----------------------------------------------------------------------------
    def check_integrity(self, holders: Iterable[Sequence[int]]) -> None:
        """free + referenced == total, free blocks unreferenced, hash map consistent, and every
        reference count equal to the number of holders (requests, session pins) listing the block."""
        expected = [0] * self.num_blocks
        for held in holders:
            for block in held:
                expected[block] += 1
        used = sum(1 for c in self.ref_counts if c > 0)
        assert len(self.free_queue) + used == self.num_blocks, (
            f"free {len(self.free_queue)} + used {used} != total {self.num_blocks}")
        for block in self.free_queue:
            assert self.ref_counts[block] == 0, f"block {block} is free but has {self.ref_counts[block]} references"
        for block_hash, block in self.cached.items():
            assert self.block_hashes[block] == block_hash, f"hash map entry of block {block} is stale"
        assert sum(h is not None for h in self.block_hashes) == len(self.cached), "unindexed block hash"
        for block, (count, want) in enumerate(zip(self.ref_counts, expected)):
            assert count == want, f"block {block} has {count} references but {want} holders"
