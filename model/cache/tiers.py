"""The tiers below the block pool, behind one interface the KV manager uses: save blocks out of the
cache, restore a run of blocks into it, and the sessions recorded on disk.

    pool (the cache tensors)  →  host memory (HostTier, optional)  →  disk (DiskTier, optional)

Saving (`save`, on the engine thread) copies the blocks' rows out of the cache tensors in one
gather per layer — on a GPU into pinned host memory on a side stream, the compute stream waiting for
that copy (on the device, not the host) before it may overwrite the rows — then keeps them in the
host tier and queues them for the disk writer. Nothing waits for the disk.

Restoring is asynchronous: `start_restore` hands the chained hashes that follow a request's hit in
the pool to the restore thread, which reads the longest run of consecutive blocks it finds (host
tier first, then disk) into a `RestoreTicket`; the request waits meanwhile and other requests keep
running. When the ticket is done the KV manager allocates blocks and `install`s the rows into them.

Events (hits, misses, bytes, restore latency, invalid files, write errors) go to an observer with
`on_tier_event(tier, event, amount, reason)`; the server turns them into metrics.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from model.cache.disk_tier import DiskTier, SessionManifest
from model.cache.fingerprint import ModelFingerprint
from model.cache.host_tier import HostTier
from model.cache.kv_cache import GIB, KVCache

log = logging.getLogger("customllm.kv_tiers")


class TierObserver(Protocol):
    def on_tier_event(self, tier: str, event: str, amount: float = 1.0, reason: str = "") -> None: ...


@dataclass
class RestoreTicket:
    """A run of blocks being read for one request: `hashes[i]` is the request's block
    `first_block + i`; `rows` fills with consecutive hits from `hashes[0]` until `done`."""

    first_block: int
    hashes: list[bytes]
    started: float
    rows: list[torch.Tensor] = field(default_factory=list)      # each [num_layers, block_size, row_width]
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False

    def run_from(self, block: int) -> tuple[list[bytes], list[torch.Tensor]]:
        """The restored (hashes, rows) from the request's block `block` on (nothing if the run does
        not reach it, e.g. the pool lost blocks before it while the request waited)."""
        if not self.first_block <= block < self.first_block + len(self.rows):
            return [], []
        k = block - self.first_block
        return self.hashes[k:len(self.rows)], self.rows[k:]


class CacheTiers:
    def __init__(self, cache: KVCache, host: HostTier | None, disk: DiskTier | None,
                 observer: TierObserver | None = None):
        assert host is not None or disk is not None, "tiers need a host tier, a disk tier or both"
        self.cache = cache
        self.host = host
        self.disk = disk
        self.observer = observer
        self.device = cache.layers[0].device
        self.side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._tickets: queue.Queue[RestoreTicket | None] = queue.Queue()
        self._restored = threading.Event()
        self._thread = threading.Thread(target=self._restore_loop, name="kv-restore", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, cache: KVCache, model: nn.Module, disk_dir: str | None, disk_gib: float, host_gib: float,
             observer: TierObserver | None = None) -> "CacheTiers | None":
        """The tiers the flags ask for, or None (no tier asked for, a model with a sliding window, or
        the disk unusable: warned)."""
        if (disk_dir or host_gib > 0) and getattr(model.config, "sliding_window", None) is not None:
            log.warning("cache tiers are not used with a sliding-window model: --kv-disk-dir and --kv-host-gib ignored")
            return None
        host = HostTier(int(host_gib * GIB)) if host_gib > 0 else None
        disk = None
        if disk_dir:
            if disk_gib <= 0:
                raise ValueError("--kv-disk-gib must be positive")
            started = time.monotonic()
            fingerprint = ModelFingerprint.of(model, cache.dtype, cache.block_size)
            disk = DiskTier(disk_dir, int(disk_gib * GIB), fingerprint, observer)
            if not disk.enabled:
                disk.close()
                disk = None
            else:
                log.info("disk tier: %s/%s, %.2f GiB bound, %.2f GiB in use, %s (fingerprint in %.2f s)", disk_dir,
                         fingerprint.name, disk_gib, disk.bytes_used / GIB,
                         "read-write" if disk.writable else "read-only", time.monotonic() - started)
        if host is None and disk is None:
            return None
        return cls(cache, host, disk, observer)

    # ---- saving (engine thread) -----------------------------------------------------------------
    def holds(self, block_hash: bytes) -> bool:
        """Known to be in a tier (no I/O)."""
        return ((self.host is not None and self.host.contains(block_hash))
                or (self.disk is not None and self.disk.contains(block_hash)))

    def save(self, block_ids: list[int], hashes: list[bytes]) -> None:
        """Copy these full blocks out of the cache and pass them down the tiers; blocks a tier already
        holds are only marked used."""
        todo = [(b, h) for b, h in zip(block_ids, hashes) if not self.holds(h)]
        if self.disk is not None:
            self.disk.touch([h for h in hashes if self.disk.contains(h)])
        if not todo:
            return
        rows, ready = self._gather([b for b, _ in todo])                # [L, n, B, W]
        blocks = [(h, rows[:, i]) for i, (_, h) in enumerate(todo)]      # each [L, B, W]
        if self.host is not None:
            for h, block_rows in blocks:
                self.host.put(h, block_rows, ready)
        if self.disk is not None:
            self.disk.write(blocks, ready)

    def _gather(self, block_ids: list[int]) -> tuple[torch.Tensor, Callable[[], None] | None]:
        """The rows of `block_ids` as [num_layers, n, block_size, row_width] on the host, and what to
        call before reading them (a side-stream copy still in flight), or None."""
        bs, width = self.cache.block_size, self.cache.config.cache_row_width
        index = torch.tensor(block_ids, device=self.device)
        out = torch.empty((len(self.cache.layers), len(block_ids), bs, width), dtype=self.cache.dtype,
                          pin_memory=self.side_stream is not None)
        if self.side_stream is None:
            for layer, dest in zip(self.cache.layers, out):
                torch.index_select(layer.view(-1, bs, width), 0, index, out=dest)     # [n, B, W]
            return out, None
        compute = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(compute)             # the rows as the steps so far left them
        with torch.cuda.stream(self.side_stream):
            for layer, dest in zip(self.cache.layers, out):
                dest.copy_(layer.view(-1, bs, width).index_select(0, index), non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.side_stream)
        compute.wait_stream(self.side_stream)             # no later step overwrites them before the copy
        return out, copied.synchronize

    def install(self, block_ids: list[int], rows: list[torch.Tensor]) -> None:
        """Write restored rows (each [L, B, W], on the host) into the cache blocks `block_ids`."""
        bs, width = self.cache.block_size, self.cache.config.cache_row_width
        index = torch.tensor(block_ids, device=self.device)
        stacked = torch.stack(rows, dim=1)                                             # [L, n, B, W]
        for layer, layer_rows in zip(self.cache.layers, stacked):
            layer.view(-1, bs, width).index_copy_(0, index, layer_rows.to(self.device, non_blocking=True))

    # ---- restoring ------------------------------------------------------------------------------
    def start_restore(self, hashes: list[bytes], first_block: int) -> RestoreTicket | None:
        """Begin reading the run of blocks named by `hashes` (the request's blocks from `first_block`
        on), or None when the first one is in no tier (a miss: nothing to wait for)."""
        if not hashes:
            return None
        first = hashes[0]
        if not ((self.host is not None and self.host.contains(first))
                or (self.disk is not None and self.disk.probe(first))):
            self._event("any", "misses")
            return None
        ticket = RestoreTicket(first_block, list(hashes), time.monotonic())
        self._tickets.put(ticket)
        return ticket

    def wait(self, tickets: list[RestoreTicket], timeout: float) -> None:
        """Block until one of `tickets` is done (or `timeout` seconds)."""
        self._restored.clear()
        if not any(t.done.is_set() for t in tickets):
            self._restored.wait(timeout)

    def _restore_loop(self) -> None:
        while (ticket := self._tickets.get()) is not None:
            sources = {"host": 0, "disk": 0}
            try:
                for block_hash in ticket.hashes:
                    if ticket.cancelled:
                        break
                    rows = self.host.get(block_hash) if self.host is not None else None
                    source = "host"
                    if rows is None and self.disk is not None:
                        rows, source = self.disk.read(block_hash), "disk"
                        if rows is not None and self.host is not None:
                            self.host.put(block_hash, rows)
                    if rows is None:
                        break
                    ticket.rows.append(rows)
                    sources[source] += 1
            except Exception as exc:  # noqa: BLE001 - a failed restore is a miss, never an error
                log.exception("restoring cached blocks failed: %s", exc)
            for tier, count in sources.items():
                if count:
                    self._event(tier, "hit_blocks", count)
            if ticket.rows:
                self._event("any", "restore_seconds", time.monotonic() - ticket.started)
            else:
                self._event("any", "misses")
            ticket.done.set()
            self._restored.set()

    # ---- sessions on disk -----------------------------------------------------------------------
    def write_session(self, tenant: str, session_id: str, num_tokens: int, hashes: list[bytes]) -> None:
        if self.disk is not None:
            self.disk.write_session(tenant, session_id, num_tokens, hashes)

    def session(self, tenant: str, session_id: str) -> SessionManifest | None:
        return self.disk.session(tenant, session_id) if self.disk is not None else None

    def sessions(self, tenant: str) -> list[SessionManifest]:
        return self.disk.sessions(tenant) if self.disk is not None else []

    def blocks_on_disk(self, hashes: list[bytes], probe: bool = False) -> int:
        """How many of `hashes`, from the first, have their files written (not only queued) without a
        gap: as far as this process knows, or (`probe`) as the directory says."""
        count = 0
        while self.disk is not None and count < len(hashes) and self.disk.written(hashes[count], probe):
            count += 1
        return count

    def forget(self, tenant: str, session_id: str, hashes: list[bytes], keep: set[bytes]) -> bool:
        """Drop a session's copies in every tier but the blocks in `keep`; True if it was on disk."""
        if self.host is not None:
            self.host.discard(set(hashes) - keep)
        return self.disk.delete_session(tenant, session_id, hashes, keep) if self.disk is not None else False

    # ---- life cycle -----------------------------------------------------------------------------
    def bytes_used(self, tier: str) -> int:
        source = self.host if tier == "host" else self.disk
        return source.bytes_used if source is not None else 0

    def flush(self, timeout: float = 30.0) -> bool:
        return self.disk.flush(timeout) if self.disk is not None else True

    def close(self, timeout: float = 10.0) -> None:
        self._tickets.put(None)
        self._thread.join(timeout)
        if self.disk is not None:
            self.disk.close(timeout)

    def _event(self, tier: str, event: str, amount: float = 1.0) -> None:
        if self.observer is not None:
            self.observer.on_tier_event(tier, event, amount, "")
