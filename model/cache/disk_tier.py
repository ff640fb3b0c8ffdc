"""The disk tier: cache blocks and session manifests as files under one directory, bounded in size.

Layout (`root` is `--kv-disk-dir`; it may be shared by replicas):

    root/<fingerprint name>/<block hash hex>.kvb          one block (model/cache/block_file.py)
    root/<fingerprint name>/sessions/<key hex>.json       one session: its tokens and block hashes

Files are content-addressed: a block's name is its chained prefix hash (tenant-salted), in the
directory of the model fingerprint that computed it (the header says so again). Every file is written
to a temporary name (0600) and renamed into place, so a reader, or a server killed mid-write, never
sees half a file; each block file's CRC-32 catches what rename cannot. Directories are 0700.

Writes happen on one background thread (`write`, `write_session` and `delete_session` only queue
work; at most `max_pending_bytes` of rows wait, more are dropped and counted). Before each write
the least recently used files of the whole root are removed until the new file fits under
`max_bytes`, so the root never holds more than `max_bytes` plus the one file being renamed in. Reads
(`read`, on the restore thread) validate every file: a truncated, foreign, corrupt or misplaced one is
skipped with one log line and a metric, and removed. Reads and rewrites refresh a file's mtime, the
LRU order other replicas and later processes see; the index of sizes is rebuilt from the directory
every `rescan_s` seconds (and at start), which is how a replica learns of the others' files.

A failed write (disk full, read-only, permissions) turns writing off with one warning; reads go on.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

import torch

from model.cache import block_file, session_manifest
from model.cache.fingerprint import ModelFingerprint
from model.cache.session_manifest import SessionManifest, manifest_name, tenant_tag

log = logging.getLogger("customllm.kv_disk")
BLOCK_SUFFIX, MANIFEST_SUFFIX, TMP_SUFFIX = ".kvb", ".json", ".tmp"
STALE_TMP_S = 3600.0          # a temporary file this old was left by a killed writer
Rows = torch.Tensor           # one block's rows, [num_layers, block_size, row_width], on the CPU


class DiskTier:
    def __init__(self, root: str | os.PathLike, max_bytes: int, fingerprint: ModelFingerprint,
                 observer=None, *, max_pending_bytes: int = 256 << 20, rescan_s: float = 30.0):
        self.root = Path(root)
        self.dir = self.root / fingerprint.name
        self.sessions_dir = self.dir / "sessions"
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint.digest
        self.shape = (fingerprint.num_layers, fingerprint.block_size, fingerprint.row_width)
        self.dtype = getattr(torch, fingerprint.dtype.removeprefix("torch."))
        self.file_size = block_file.file_size(*self.shape, torch.empty((), dtype=self.dtype).element_size())
        self.max_pending_bytes = max_pending_bytes
        self.rescan_s = rescan_s
        self.observer = observer
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()          # path -> bytes, least recently used first
        self._used = 0
        self._pending: dict[bytes, tuple[Rows, Callable | None]] = {}   # queued: readable until written
        self._pending_bytes = 0
        self._manifests: dict[str, tuple[str, SessionManifest]] = {}   # name -> (tenant tag, manifest)
        self._queued_manifests: dict[str, int] = {}                     # name -> writes queued
        self._queue: queue.Queue = queue.Queue()
        self.readable = self.writable = False
        self._open()
        self._rescan()
        self._thread = threading.Thread(target=self._run, name="kv-disk-writer", daemon=True)
        self._thread.start()

    # ---- state --------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.readable

    @property
    def bytes_used(self) -> int:
        return self._used

    def block_path(self, block_hash: bytes) -> str:
        return str(self.dir / (block_hash.hex() + BLOCK_SUFFIX))

    def contains(self, block_hash: bytes) -> bool:
        """On disk or queued for it, as far as this process knows (no I/O)."""
        return block_hash in self._pending or self.block_path(block_hash) in self._lru

    def probe(self, block_hash: bytes) -> bool:
        """`contains`, else whether the file exists (written by another replica since the last scan)."""
        return self.readable and (self.contains(block_hash) or os.path.exists(self.block_path(block_hash)))

    def written(self, block_hash: bytes, look: bool = False) -> bool:
        """Its file is written (not only queued): as far as this process knows, or as the directory says."""
        path = self.block_path(block_hash)
        return path in self._lru or (look and self.readable and os.path.exists(path))

    # ---- blocks -------------------------------------------------------------------------------
    def write(self, blocks: list[tuple[bytes, Rows]], ready: Callable[[], None] | None = None) -> None:
        """Queue blocks for writing (engine thread; no I/O), but those already on disk or queued;
        `ready()` is called before the rows are read (a device copy still in flight)."""
        new = [(h, rows) for h, rows in blocks if not self.contains(h)]
        size = sum(rows.nbytes for _, rows in new)
        if not new or not self.writable:
            return
        if self._pending_bytes + size > self.max_pending_bytes:
            self._event("dropped_writes", len(new))
            return
        for h, rows in new:
            self._pending[h] = (rows, ready)
        self._pending_bytes += size
        self._queue.put(("blocks", new, ready))

    def touch(self, block_hashes: list[bytes]) -> None:
        """Mark blocks as used now (their files' mtimes too, in the background)."""
        if self.writable and block_hashes:
            self._queue.put(("touch", block_hashes))

    def read(self, block_hash: bytes) -> Rows | None:
        """The rows of a block, or None (not there, or an invalid file: logged, counted, removed)."""
        if not self.readable:
            return None
        pending = self._pending.get(block_hash)
        if pending is not None:
            if pending[1] is not None:
                pending[1]()
            return pending[0]
        path = self.block_path(block_hash)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = bytearray(min(size, self.file_size))
                got = f.readinto(data)
            rows = block_file.decode(data[:got], self.fingerprint, block_hash, self.shape, self.dtype, size)
        except FileNotFoundError:
            return None
        except block_file.InvalidBlockFile as exc:
            self._invalid(path, exc.reason, str(exc))
            return None
        except OSError as exc:
            self._invalid(path, "unreadable", str(exc))
            return None
        self._event("read_bytes", size)
        with self._lock:
            if path in self._lru:
                self._lru.move_to_end(path)
            else:
                self._lru[path] = size
                self._used += size
        self._utime(path)
        return rows

    # ---- sessions -----------------------------------------------------------------------------
    def write_session(self, tenant: str, session_id: str, num_tokens: int, block_hashes: list[bytes]) -> None:
        """Record a session's blocks (after its blocks, in the same queue)."""
        if not self.writable or not block_hashes:
            return
        manifest = SessionManifest(session_id, num_tokens, tuple(block_hashes), time.time())
        name = manifest_name(tenant, session_id)
        with self._lock:
            self._manifests[name] = (tenant_tag(tenant), manifest)
            self._queued_manifests[name] = self._queued_manifests.get(name, 0) + 1
        self._queue.put(("manifest", name, tenant_tag(tenant), manifest))

    def session(self, tenant: str, session_id: str) -> SessionManifest | None:
        name = manifest_name(tenant, session_id)
        entry = self._manifests.get(name)
        if entry is None and self.readable:
            entry = session_manifest.load(self.sessions_dir / (name + MANIFEST_SUFFIX))
            if entry is not None and entry[1].session_id == session_id:
                with self._lock:
                    self._manifests[name] = entry
        return entry[1] if entry is not None and entry[0] == tenant_tag(tenant) else None

    def sessions(self, tenant: str) -> list[SessionManifest]:
        tag = tenant_tag(tenant)
        with self._lock:
            found = [m for t, m in self._manifests.values() if t == tag]
        return sorted(found, key=lambda m: m.last_used)

    def delete_session(self, tenant: str, session_id: str, hashes: Iterable[bytes], keep: set[bytes]) -> bool:
        """Forget a session on disk: its manifest and its block files (`hashes` and the manifest's),
        except those in `keep` or in another session's manifest. True if a manifest was there."""
        manifest = self.session(tenant, session_id)
        name = manifest_name(tenant, session_id)
        with self._lock:
            self._manifests.pop(name, None)
        doomed = set(hashes) | set(manifest.block_hashes if manifest else ())
        self._queue.put(("forget", name, doomed - keep))
        return manifest is not None

    # ---- life cycle ---------------------------------------------------------------------------
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is written (or dropped)."""
        done = threading.Event()
        self._queue.put(("barrier", done))
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- the writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        last_scan = time.monotonic()
        while True:
            try:
                op = self._queue.get(timeout=self.rescan_s)
                if op is None:
                    return
                self._do(op)
            except queue.Empty:
                pass
            except Exception as exc:  # noqa: BLE001 - the writer must never die
                log.exception("disk tier: %s failed: %s", op[0], exc)
            if time.monotonic() - last_scan >= self.rescan_s:
                self._rescan()
                last_scan = time.monotonic()

    def _do(self, op: tuple) -> None:
        kind = op[0]
        if kind == "blocks":
            _, blocks, ready = op
            try:
                if ready is not None and self.writable:
                    ready()
                for h, rows in blocks:
                    if self.writable:
                        header, payload, trailer = block_file.encode(rows, self.fingerprint, h)
                        self._write_file(self.block_path(h), (header, payload, trailer))
            finally:
                for h, rows in blocks:
                    if self._pending.pop(h, None) is not None:
                        self._pending_bytes -= rows.nbytes
        elif kind == "manifest":
            _, name, tag, m = op
            body = session_manifest.encode(tag, m)
            try:
                if self.writable and self._manifests.get(name, (None, None))[1] is m:
                    self._write_file(str(self.sessions_dir / (name + MANIFEST_SUFFIX)), (body,))
            finally:
                with self._lock:
                    left = self._queued_manifests.pop(name) - 1
                    if left:
                        self._queued_manifests[name] = left
        elif kind == "forget":
            _, name, doomed = op
            with self._lock:
                shared = {h for _, m in self._manifests.values() for h in m.block_hashes}
            paths = [str(self.sessions_dir / (name + MANIFEST_SUFFIX))]
            paths += [self.block_path(h) for h in doomed - shared]
            for path in paths:
                self._remove(path)
        elif kind == "touch":
            for path in map(self.block_path, op[1]):
                with self._lock:
                    if path in self._lru:
                        self._lru.move_to_end(path)
                self._utime(path)
        elif kind == "barrier":
            op[1].set()

    def _write_file(self, path: str, parts: tuple) -> None:
        size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        if not self._make_room(size):
            self._event("dropped_writes", 1)
            return
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{os.getpid()}.{threading.get_native_id()}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                for part in parts:
                    view = memoryview(part).cast("B")
                    while view:
                        view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            self._remove(tmp, indexed=False)
            self._disable_writes(exc)
            return
        with self._lock:
            old = self._lru.pop(path, 0)
            self._lru[path] = size
            self._used += size - old
        self._event("written_bytes", size)

    def _make_room(self, size: int) -> bool:
        """Remove least recently used files until `size` more bytes fit under the bound."""
        while True:
            with self._lock:
                if self._used + size <= self.max_bytes or not self._lru:
                    return self._used + size <= self.max_bytes
                path, _ = next(iter(self._lru.items()))
            self._remove(path)

    def _remove(self, path: str, indexed: bool = True) -> None:
        if indexed:
            with self._lock:
                self._used -= self._lru.pop(path, 0)
                if path.endswith(MANIFEST_SUFFIX):
                    self._manifests.pop(os.path.basename(path)[:-len(MANIFEST_SUFFIX)], None)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._disable_writes(exc)

    # ---- directory ----------------------------------------------------------------------------
    def _open(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for directory in (self.dir, self.sessions_dir):
                directory.mkdir(mode=0o700, exist_ok=True)
                os.chmod(directory, 0o700)          # ours: whatever the umask or an earlier server left
            if not os.access(self.sessions_dir, os.W_OK | os.X_OK):
                raise PermissionError(f"{self.dir} is not writable")
            self.readable = self.writable = True
        except OSError as exc:
            self.readable = self.dir.is_dir() and os.access(self.dir, os.R_OK | os.X_OK)
            log.warning("disk tier: %s cannot be written (%s): %s", self.root, exc,
                        "reading what is there, writing nothing" if self.readable else "no disk tier")
            self._event("write_error")

    def _rescan(self) -> None:
        """Rebuild the size index (LRU by mtime) of every block and manifest file under the root, learn
        the sessions other replicas wrote, drop those whose first block is gone, remove stale temporaries."""
        if not self.readable:
            return
        found: list[tuple[float, str, int]] = []
        now = time.time()
        subdirs = self._subdirs(self.root)
        for directory in subdirs + [d / "sessions" for d in subdirs]:
            for entry in self._entries(directory):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.name.endswith(TMP_SUFFIX):
                    if now - st.st_mtime > STALE_TMP_S and self.writable:
                        self._remove(entry.path, indexed=False)
                elif entry.is_file(follow_symlinks=False) and entry.name.endswith((BLOCK_SUFFIX, MANIFEST_SUFFIX)):
                    found.append((st.st_mtime, entry.path, st.st_size))
        found.sort()
        seen_manifests = {os.path.basename(p)[:-len(MANIFEST_SUFFIX)]: p for _, p, _ in found
                          if p.startswith(str(self.sessions_dir) + os.sep)}
        with self._lock:
            self._lru = OrderedDict((path, size) for _, path, size in found)
            self._used = sum(self._lru.values())
            known = dict(self._manifests)
        manifests = {}
        for name, path in seen_manifests.items():
            entry = known.get(name) or session_manifest.load(Path(path))
            if entry is not None:
                manifests[name] = entry
        with self._lock:
            queued = {n: e for n, e in self._manifests.items() if n in self._queued_manifests}
            self._manifests = {**manifests, **queued}
        for name, (_, m) in manifests.items():
            if self.writable and not self.contains(m.block_hashes[0]):
                self._remove(seen_manifests[name])

    @staticmethod
    def _entries(directory: Path) -> list[os.DirEntry]:
        try:
            return list(os.scandir(directory))
        except OSError:
            return []

    def _subdirs(self, root: Path) -> list[Path]:
        return [Path(e.path) for e in self._entries(root) if e.is_dir(follow_symlinks=False)]

    # ---- faults and events --------------------------------------------------------------------
    def _invalid(self, path: str, reason: str, detail: str) -> None:
        log.warning("disk tier: skipping %s, computing its block instead (%s)", path, detail)
        self._event("invalid_files", 1, reason)
        if self.writable and reason != "unreadable":
            self._remove(path)

    def _disable_writes(self, exc: OSError) -> None:
        if self.writable:
            self.writable = False
            log.warning("disk tier: writing to %s failed (%s); no more writes (reads go on)", self.root, exc)
            self._event("write_error")

    def _utime(self, path: str) -> None:
        if self.writable:
            try:
                os.utime(path)
            except OSError:
                pass

    def _event(self, event: str, amount: float = 1.0, reason: str = "") -> None:
        if self.observer is not None:
            self.observer.on_tier_event("disk", event, amount, reason)
