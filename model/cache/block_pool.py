"""The KV-cache block pool: plain Python over block ids, no tensors.

Every block has a reference count (how many requests and session pins hold it) and, once full,
a content hash chained from the previous block's hash, its token ids and a salt (the tenant), so
identical prefixes of one tenant share blocks and different tenants never do.

Blocks with no reference wait in a free queue in LRU order, whether they still hold a cached
prefix or not. Allocation takes the least recently freed block first and evicts its hash; a prefix
hit on a waiting block takes it out of the queue in O(1) (an OrderedDict keyed by block id).
Running out of blocks is not an error: `allocate` returns None and the scheduler preempts.

With a sliding window (a query at p sees keys p-W .. p), a sequence no longer needs the blocks wholly
behind its window: the scheduler releases them during decoding and marks their place in the
sequence's block table with `RELEASED` (-1), which attention masks and which hashing, session pins
and integrity checks skip. `lookup_prefix(window=W)` likewise needs only the cached blocks a hit's
window reaches, and returns `RELEASED` for the ones before.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Iterable, Sequence

_HASH_PERSON = b"customllm-kv-v1"
RELEASED = -1   # a block-table entry whose block was released behind a sliding window


class BlockPool:
    """Fixed-size KV blocks `0..num_blocks-1` with reference counts, chained prefix hashes and an
    LRU free queue.

    Invariants (checked by `check_integrity`): every block is either in the free queue with no
    reference, or out of it with at least one; a hash maps to the blocks that carry it.

    One hash may be carried by several blocks: two requests that computed the same prefix at the
    same time, or a request whose last prompt block was recomputed on purpose (a prefix hit must
    leave one token to compute) while the first copy was still held. Every copy stays findable
    until it is evicted, so whichever copy a session pins keeps the chain alive. Lookups prefer a
    copy that is already referenced, so shared prefixes converge on one block.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the block pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, dict[int, None]] = {}          # hash → the blocks carrying it
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.num_evictions = 0
        self._num_cached_free = 0
        # (block, hash) of each cached block `allocate` evicts, while a slower tier wants them (its
        # rows are intact until the allocating request's step writes them); None: not recorded
        self.evicted: list[tuple[int, bytes]] | None = None

    # ---- hashing --------------------------------------------------------------------------------
    @staticmethod
    def hash_block(parent: bytes | None, token_ids: Sequence[int], salt: str) -> bytes:
        """16-byte blake2b of (parent hash, salt, token ids), each field length-prefixed or
        fixed-width so that no two different inputs share an encoding."""
        salt_bytes = salt.encode("utf-8")
        digest = hashlib.blake2b(digest_size=16, person=_HASH_PERSON)
        if parent is None:
            digest.update(b"\x00")
        else:
            digest.update(b"\x01" + struct.pack("<I", len(parent)) + parent)
        digest.update(struct.pack("<I", len(salt_bytes)) + salt_bytes)
        digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
        return digest.digest()

    def hash_prefix_blocks(self, token_ids: Sequence[int], salt: str) -> list[bytes]:
        """Chained hashes of every full block of `token_ids` (a partial last block has none)."""
        hashes: list[bytes] = []
        bs = self.block_size
        for start in range(0, len(token_ids) - bs + 1, bs):
            hashes.append(self.hash_block(hashes[-1] if hashes else None, token_ids[start:start + bs], salt))
        return hashes

    # ---- gauges ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` can hand out now, cached-but-unreferenced ones included."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached_free_blocks(self) -> int:
        return self._num_cached_free

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    # ---- operations -----------------------------------------------------------------------------
    def lookup_prefix(self, token_ids: Sequence[int], salt: str, max_blocks: int | None = None,
                      window: int | None = None) -> list[int]:
        """The longest prefix of full blocks of `token_ids` (this salt, at most `max_blocks`) whose
        cached blocks let the next token be computed. Without a window that is the unbroken chain
        from block 0. With window W, a hit of n blocks computes position n*B next, which sees keys
        from n*B - W on: only the blocks from there to n-1 must be cached, and the ones before come
        back as `RELEASED`. Reference counts are not changed (call `acquire` on the real ids)."""
        limit = len(token_ids) // self.block_size
        if max_blocks is not None:
            limit = min(limit, max(0, max_blocks))
        bs = self.block_size
        found: list[int | None] = []      # per block: a cached copy, or None
        parent = None
        for i in range(limit):
            parent = self.hash_block(parent, token_ids[i * bs:(i + 1) * bs], salt)
            copies = self.cached.get(parent)
            if not copies:
                if window is None:
                    break
                found.append(None)
                continue
            found.append(next((b for b in copies if self.ref_counts[b] > 0), next(iter(copies))))
        if window is None:
            return [b for b in found if b is not None]
        best, run_start = 0, 0            # run_start: first block of the cached run ending at block n-1
        for n in range(1, len(found) + 1):
            if found[n - 1] is None:
                run_start = n
            elif run_start <= self.first_needed_block(n * bs, bs, window):
                best = n
        first_needed = self.first_needed_block(best * bs, bs, window)
        return [RELEASED] * first_needed + [b for b in found[first_needed:best]]

    @staticmethod
    def first_needed_block(next_position: int, block_size: int, window: int | None) -> int:
        """Blocks before this one are wholly behind the window of every query at `next_position`
        or later (0 without a window)."""
        return 0 if window is None else max(0, next_position - window) // block_size

    def acquire(self, block_ids: Iterable[int]) -> None:
        """One more reference on each block; a block that had none leaves the free queue."""
        for block in block_ids:
            self._check_id(block)
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
                if self.block_hashes[block] is not None:
                    self._num_cached_free -= 1
            self.ref_counts[block] += 1

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks with one reference each, or None (nothing changed) if too few are
        free. A popped block that still carried a cached prefix loses it (an eviction)."""
        assert count >= 0, f"cannot allocate {count} blocks"
        if count > len(self.free_queue):
            return None
        blocks = []
        for _ in range(count):
            block, _ = self.free_queue.popitem(last=False)
            if self.block_hashes[block] is not None:
                if self.evicted is not None:
                    self.evicted.append((block, self.block_hashes[block]))
                self._num_cached_free -= 1
                self._unhash(block)
                self.num_evictions += 1
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block. Blocks reaching zero join the free queue in reverse
        order: hashed ones at the tail, so a sequence's last blocks are evicted before its prefix
        (a later prompt can only hit a prefix); unhashed ones, which nothing can hit, at the head,
        so they are reused before any cached block is evicted."""
        for block in reversed(block_ids):
            self._check_id(block)
            assert self.ref_counts[block] > 0, f"block {block} released more often than acquired"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
                if self.block_hashes[block] is None:
                    self.free_queue.move_to_end(block, last=False)
                else:
                    self._num_cached_free += 1

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Make a full block findable by its chained hash. Idempotent; a block's hash never changes
        until the block is evicted."""
        self._check_id(block_id)
        current = self.block_hashes[block_id]
        if current is not None:
            assert current == block_hash, f"block {block_id} is already cached with another hash"
            return
        self.block_hashes[block_id] = block_hash
        self.cached.setdefault(block_hash, {})[block_id] = None
        if self.ref_counts[block_id] == 0:
            self._num_cached_free += 1

    def forget(self, block_ids: Iterable[int]) -> int:
        """Drop the cached prefix of those blocks nothing references (they go to the head of the free
        queue, like blocks that were never cached); referenced ones keep it. Returns how many."""
        forgotten = 0
        for block in block_ids:
            self._check_id(block)
            if self.ref_counts[block] == 0 and self.block_hashes[block] is not None:
                self._unhash(block)
                self._num_cached_free -= 1
                self.free_queue.move_to_end(block, last=False)
                forgotten += 1
        return forgotten

    def block_hash_of(self, block_id: int) -> bytes | None:
        return self.block_hashes[block_id]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (free and referenced blocks alike), e.g. after new weights.
        References and the free queue are left as they are; nothing counts as an eviction."""
        self.cached.clear()
        self.block_hashes = [None] * self.num_blocks
        self._num_cached_free = 0

    def _unhash(self, block: int) -> None:
        block_hash = self.block_hashes[block]
        copies = self.cached[block_hash]
        del copies[block]
        if not copies:
            del self.cached[block_hash]
        self.block_hashes[block] = None

    def _check_id(self, block: int) -> None:
        assert 0 <= block < self.num_blocks, f"block id {block} is outside 0..{self.num_blocks - 1}"

    # ---- invariants -----------------------------------------------------------------------------
    def check_integrity(self, holders: Iterable[Sequence[int]]) -> None:
        """Raise AssertionError unless: free + referenced == total; free blocks are unreferenced;
        the hash map and the per-block hashes agree; the cached-free gauge is right; and every
        reference count equals the number of times the block appears across `holders` (one list
        per request and per session pin)."""
        expected = [0] * self.num_blocks
        for held in holders:
            for block in held:
                assert 0 <= block < self.num_blocks, f"a holder lists block id {block}, outside the pool"
                expected[block] += 1
        used = sum(1 for c in self.ref_counts if c > 0)
        assert len(self.free_queue) + used == self.num_blocks, (
            f"free {len(self.free_queue)} + used {used} != total {self.num_blocks}")
        for block in self.free_queue:
            assert self.ref_counts[block] == 0, f"block {block} is free but has {self.ref_counts[block]} references"
        num_indexed = 0
        for block_hash, copies in self.cached.items():
            assert copies, "a hash map entry with no block"
            for block in copies:
                assert self.block_hashes[block] == block_hash, f"hash map entry of block {block} is stale"
            num_indexed += len(copies)
        assert num_indexed == sum(h is not None for h in self.block_hashes), "a block hash missing from the map"
        cached_free = sum(1 for b in self.free_queue if self.block_hashes[b] is not None)
        assert cached_free == self._num_cached_free, (
            f"cached free blocks gauge {self._num_cached_free} != actual {cached_free}")
        for block, (count, want) in enumerate(zip(self.ref_counts, expected)):
            assert count == want, f"block {block} has {count} references but {want} holders"
