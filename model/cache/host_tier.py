"""The host-memory tier: recently saved cache blocks kept in RAM, between the pool and the disk.

Its purpose is the GPU: the pool lives in device memory, and a block copied out of it (into pinned
host memory, on a side stream: `model/cache/tiers.py`) can be restored from here without touching
the disk. On the CPU the pool itself is host memory, so the tier is off unless asked for
(`--kv-host-gib`); it works the same there (CPU tensors), which is how it is tested.

Plain LRU bounded in bytes; entries are the rows `[num_layers, block_size, row_width]` a save copied
out (views of the save's batch buffer: the bound counts the rows, and a batch's buffer is freed once
its last block is evicted), with what to call before the host reads them (`ready`: the device copy
that fills them may still be in flight; `get` waits for it). Thread-safe: the engine thread puts, the
restore thread gets.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import torch


class HostTier:
    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("the host tier needs a positive size")
        self.max_bytes = max_bytes
        # hash -> (rows [L, B, W], ready or None), least recently used first
        self._blocks: OrderedDict[bytes, tuple[torch.Tensor, Callable[[], None] | None]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._blocks)

    def contains(self, block_hash: bytes) -> bool:
        return block_hash in self._blocks

    def put(self, block_hash: bytes, rows: torch.Tensor, ready: Callable[[], None] | None = None) -> None:
        """Keep a block's rows (most recently used), evicting the least recently used to fit; a block
        larger than the whole tier is not kept."""
        size = rows.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._blocks.pop(block_hash, None)
            if old is not None:
                self._used -= old[0].nbytes
            while self._blocks and self._used + size > self.max_bytes:
                _, (evicted, _) = self._blocks.popitem(last=False)
                self._used -= evicted.nbytes
            self._blocks[block_hash] = (rows, ready)
            self._used += size

    def get(self, block_hash: bytes) -> torch.Tensor | None:
        """A block's rows (marked most recently used, their copy finished), or None."""
        with self._lock:
            entry = self._blocks.get(block_hash)
            if entry is None:
                return None
            self._blocks.move_to_end(block_hash)
        rows, ready = entry
        if ready is not None:
            ready()
        return rows

    def discard(self, block_hashes) -> None:
        with self._lock:
            for block_hash in block_hashes:
                entry = self._blocks.pop(block_hash, None)
                if entry is not None:
                    self._used -= entry[0].nbytes
