"""The disk tier on its own: the block file format and every way a file can be wrong, the size bound
(LRU), permissions, atomic writes under SIGKILL, a full or read-only disk, session manifests and the
model fingerprint."""
from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from model.cache import block_file
from model.cache.block_pool import BlockPool
from model.cache.disk_tier import DiskTier
from model.cache.fingerprint import ModelFingerprint, weights_digest
from tests.helpers import TierEvents, perturbed_model

ROOT = Path(__file__).resolve().parents[3]
SHAPE = (2, 4, 6)                   # layers, block size, row width


def fingerprint(weights: str = "w", dtype: str = "torch.float32") -> ModelFingerprint:
    return ModelFingerprint("arch", weights, dtype, SHAPE[1], SHAPE[2], SHAPE[0])


def block_hash(i: int, tenant: str = "t") -> bytes:
    return BlockPool.hash_block(None, [i, i + 1, i + 2, i + 3], tenant)


def rows(i: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.arange(48, dtype=torch.float32).reshape(SHAPE) + 100 * i).to(dtype)   # [L, B, W]


def tier(path: Path, max_files: int = 100, **kwargs) -> DiskTier:
    events = kwargs.pop("observer", None) or TierEvents()
    size = block_file.file_size(*SHAPE, 4)
    return DiskTier(path, max_files * size, kwargs.pop("fp", None) or fingerprint(), events, **kwargs)


def files_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- the format -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_block_file_round_trips_exactly(dtype):
    fp = fingerprint(dtype=str(dtype)).digest
    header, payload, trailer = block_file.encode(rows(3, dtype), fp, block_hash(3))
    data = bytearray(header + payload.tobytes() + trailer)
    assert len(data) == block_file.file_size(*SHAPE, torch.empty((), dtype=dtype).element_size())
    back = block_file.decode(data, fp, block_hash(3), SHAPE, dtype)
    assert back.dtype == dtype and torch.equal(back, rows(3, dtype))


def valid_file(i: int = 0, fp: bytes | None = None) -> bytearray:
    header, payload, trailer = block_file.encode(rows(i), fp or fingerprint().digest, block_hash(i))
    return bytearray(header + payload.tobytes() + trailer)


def corrupted(kind: str) -> bytearray:
    data = valid_file()
    if kind == "truncated":
        return data[:len(data) // 2]
    if kind == "oversized":
        return data + b"\0" * 8
    if kind == "foreign-format":
        data[:8] = b"NOTABLOK"
    elif kind == "foreign-version":
        data[8:12] = (99).to_bytes(4, "little")
    elif kind == "foreign-model":
        return valid_file(fp=fingerprint(weights="other").digest)
    elif kind == "wrong-checksum":
        data[block_file.HEADER.size + 5] ^= 0x40
    elif kind == "misplaced":
        return valid_file(1)
    return data


REASON = {"foreign-version": "foreign-format"}


@pytest.mark.parametrize("kind", ["truncated", "oversized", "foreign-format", "foreign-version", "foreign-model",
                                  "wrong-checksum", "misplaced"])
def test_every_invalid_file_is_skipped_once_logged_counted_and_removed(tmp_path, caplog, kind):
    disk = tier(tmp_path)
    path = Path(disk.block_path(block_hash(0)))
    path.write_bytes(bytes(corrupted(kind)))
    with pytest.raises(block_file.InvalidBlockFile) as info:
        block_file.decode(corrupted(kind), fingerprint().digest, block_hash(0), SHAPE, torch.float32)
    assert info.value.reason == REASON.get(kind, kind)
    with caplog.at_level(logging.WARNING, logger="customllm.kv_disk"):
        assert disk.probe(block_hash(0)) and disk.read(block_hash(0)) is None
    lines = [r for r in caplog.records if "skipping" in r.getMessage()]
    assert len(lines) == 1 and REASON.get(kind, kind) in lines[0].getMessage()
    assert disk.observer.count("invalid_files", REASON.get(kind, kind)) == 1
    assert not path.exists() and disk.read(block_hash(0)) is None    # gone: read once, then a plain miss
    disk.close()


def test_another_models_files_live_elsewhere_and_are_never_opened(tmp_path):
    ours, theirs = tier(tmp_path), tier(tmp_path, fp=fingerprint(weights="other"))
    theirs.write([(block_hash(0), rows(0))])
    theirs.flush()
    assert ours.dir != theirs.dir and not ours.probe(block_hash(0)) and ours.read(block_hash(0)) is None
    assert torch.equal(theirs.read(block_hash(0)), rows(0))
    ours.close(), theirs.close()


# ---- writing, the bound, permissions ------------------------------------------------------------
def test_writes_are_atomic_private_and_read_back(tmp_path):
    disk = tier(tmp_path)
    disk.write([(block_hash(i), rows(i)) for i in range(3)])
    assert disk.contains(block_hash(2)) and torch.equal(disk.read(block_hash(2)), rows(2))   # queued: readable
    assert disk.flush()
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700"
    for directory in (disk.dir, disk.sessions_dir):
        assert oct(directory.stat().st_mode & 0o777) == "0o700"
    names = sorted(p.name for p in disk.dir.iterdir() if p.is_file())
    assert names == sorted(block_hash(i).hex() + ".kvb" for i in range(3))      # no temporary file left
    for p in disk.dir.iterdir():
        if p.is_file():
            assert oct(p.stat().st_mode & 0o777) == "0o600"
    assert torch.equal(disk.read(block_hash(1)), rows(1))
    assert disk.observer.count("written_bytes") == 3 * disk.file_size == disk.bytes_used
    disk.close()


def test_the_size_bound_evicts_least_recently_used_files(tmp_path):
    disk = tier(tmp_path, max_files=4)
    for i in range(4):
        disk.write([(block_hash(i), rows(i))])
    disk.flush()
    assert disk.read(block_hash(0)) is not None            # 0 is now the most recently used
    for i in range(4, 7):
        disk.write([(block_hash(i), rows(i))])
        disk.flush()
        assert files_bytes(tmp_path) <= disk.max_bytes
    on_disk = {i for i in range(7) if Path(disk.block_path(block_hash(i))).exists()}
    assert on_disk == {0, 4, 5, 6} and disk.bytes_used == files_bytes(tmp_path)
    disk.close()
    again = tier(tmp_path, max_files=4)                     # a new process finds the same files and order
    assert again.bytes_used == files_bytes(tmp_path) and all(again.contains(block_hash(i)) for i in on_disk)
    again.close()


def test_a_full_disk_turns_writing_off_with_one_warning_and_reads_go_on(tmp_path, monkeypatch, caplog):
    disk = tier(tmp_path)
    disk.write([(block_hash(0), rows(0))])
    disk.flush()
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with caplog.at_level(logging.WARNING, logger="customllm.kv_disk"):
        disk.write([(block_hash(i), rows(i)) for i in (1, 2)])
        disk.flush()
        disk.write([(block_hash(3), rows(3))])
        disk.flush()
    monkeypatch.setattr(os, "write", real_write)
    assert not disk.writable and disk.observer.count("write_error") == 1
    assert len([r for r in caplog.records if "no more writes" in r.getMessage()]) == 1
    assert not list(disk.dir.glob(".*.tmp")) and not disk.contains(block_hash(1))
    assert torch.equal(disk.read(block_hash(0)), rows(0))
    disk.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_read_but_never_written(tmp_path, caplog):
    disk = tier(tmp_path)
    disk.write([(block_hash(0), rows(0))])
    disk.close()
    for directory in (disk.sessions_dir, disk.dir, tmp_path):
        directory.chmod(0o500)
    try:
        with caplog.at_level(logging.WARNING, logger="customllm.kv_disk"):
            ro = tier(tmp_path)
        assert ro.enabled and not ro.writable and "writing nothing" in caplog.text
        ro.write([(block_hash(1), rows(1))])
        assert ro.flush() and not ro.contains(block_hash(1))
        assert torch.equal(ro.read(block_hash(0)), rows(0))
        ro.close()
    finally:
        for directory in (tmp_path, disk.dir, disk.sessions_dir):
            directory.chmod(0o700)


def test_a_read_only_file_system_is_read_but_never_written(tmp_path, monkeypatch, caplog):
    """As a read-only mount behaves for any user, root included: the directories are there, changing
    them fails with EROFS."""
    disk = tier(tmp_path)
    disk.write([(block_hash(0), rows(0))])
    disk.close()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(os, "chmod", read_only)
    with caplog.at_level(logging.WARNING, logger="customllm.kv_disk"):
        ro = tier(tmp_path)
    assert ro.enabled and not ro.writable and "writing nothing" in caplog.text
    ro.write([(block_hash(1), rows(1))])
    ro.write_session("t", "s", 4, [block_hash(1)])
    assert ro.flush() and not ro.contains(block_hash(1)) and ro.session("t", "s") is None
    assert torch.equal(ro.read(block_hash(0)), rows(0))
    ro.close()


def test_an_unusable_directory_means_no_tier(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="customllm.kv_disk"):
        disk = tier(blocker / "kv")
    assert not disk.enabled and not disk.probe(block_hash(0)) and "no disk tier" in caplog.text
    disk.close()


WRITER = textwrap.dedent("""
    import sys, torch
    from model.cache.disk_tier import DiskTier
    from tests.model.cache.test_disk_tier import fingerprint, block_hash
    disk = DiskTier(sys.argv[1], 1 << 30, fingerprint(), max_pending_bytes=1 << 30)
    big = torch.randn(2, 4, 6)
    i = 0
    print("writing", flush=True)
    while True:
        disk.write([(block_hash(i), big + i)])
        i += 1
        if i % 64 == 0:
            disk.flush()
""")


def test_sigkill_mid_write_leaves_no_file_that_reads_as_valid(tmp_path):
    """Kill a writer at arbitrary moments, several times: every file under a final name validates,
    and the temporary files left behind are never read and are cleaned once stale."""
    for round_ in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert writer.stdout.readline().strip() == b"writing"
        deadline = time.monotonic() + 60
        while len(list(tmp_path.rglob("*.kvb"))) < 20 * (round_ + 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    disk = tier(tmp_path, rescan_s=3600)
    finals = list(disk.dir.glob("*.kvb"))
    assert len(finals) >= 60
    valid = 0
    for path in finals:
        data = bytearray(path.read_bytes())
        block_file.decode(data, fingerprint().digest, bytes.fromhex(path.stem), SHAPE, torch.float32)
        valid += 1
    assert valid == len(finals) and disk.observer.count("invalid_files") == 0
    for tmp in disk.dir.glob(".*.tmp"):                      # what a kill left mid-write: stale later
        os.utime(tmp, (time.time() - 7200, time.time() - 7200))
    disk._rescan()
    assert not list(disk.dir.glob(".*.tmp"))
    disk.close()


# ---- sessions ----------------------------------------------------------------------------------
def test_session_manifests_are_per_tenant_found_by_other_processes_and_deleted_with_their_blocks(tmp_path):
    a = tier(tmp_path)
    hashes = [block_hash(i) for i in range(3)]
    a.write([(h, rows(i)) for i, h in enumerate(hashes)])
    a.write_session("alice", "chat", 14, hashes)
    a.write([(block_hash(9, "alice"), rows(9))])
    a.write_session("alice", "other", 5, [hashes[0], block_hash(9, "alice")])   # shares block 0
    a.flush()
    b = tier(tmp_path)                                       # another process, same directory
    assert b.session("alice", "chat").block_hashes == tuple(hashes) and b.session("bob", "chat") is None
    assert [m.session_id for m in b.sessions("alice")] == ["chat", "other"] and b.sessions("bob") == []
    assert b.delete_session("alice", "chat", [], keep=set()) and b.flush()
    assert b.session("alice", "chat") is None and a.session("alice", "chat") is not None   # a: until its rescan
    assert Path(b.block_path(hashes[0])).exists()                         # still another session's
    assert not any(Path(b.block_path(h)).exists() for h in hashes[1:])
    a._rescan()
    assert a.session("alice", "chat") is None and b.delete_session("alice", "chat", [], set()) is False
    a.close(), b.close()


def test_a_manifest_whose_blocks_are_gone_is_dropped_at_the_next_scan(tmp_path):
    disk = tier(tmp_path)
    disk.write([(block_hash(0), rows(0))])
    disk.write_session("t", "s", 5, [block_hash(0)])
    disk.flush()
    os.unlink(disk.block_path(block_hash(0)))
    disk._rescan()
    assert disk.session("t", "s") is None and not list(disk.sessions_dir.iterdir())
    disk.close()


# ---- the fingerprint ---------------------------------------------------------------------------
def test_the_fingerprint_follows_weights_dtype_and_layout():
    from model.config import preset
    config = preset("custom-llm-tiny")
    model, same = perturbed_model(config, seed=1), perturbed_model(config, seed=1)
    base = ModelFingerprint.of(model, torch.float32, 16)
    assert base == ModelFingerprint.of(same, torch.float32, 16) and base.row_width == config.cache_row_width
    assert weights_digest(model) == weights_digest(same)
    with torch.no_grad():
        next(iter(same.parameters())).view(-1)[7] += 1e-3       # one value of one tensor
    assert ModelFingerprint.of(same, torch.float32, 16).digest != base.digest
    assert ModelFingerprint.of(model, torch.bfloat16, 16).digest != base.digest
    assert ModelFingerprint.of(model, torch.float32, 32).digest != base.digest
    assert len({base.name, ModelFingerprint.of(model, torch.float32, 32).name}) == 2


def test_the_fingerprint_sees_a_quantized_layers_packed_weights():
    """A quantized layer keeps its weights in buffers, not parameters: the same quantization of the
    same weights gives the same digest, and one changed packed value a different one."""
    from model.config import preset
    from model.layers.quantized_linear import QuantizedLinear, quantize_model
    config = preset("custom-llm-tiny")
    model, same = perturbed_model(config, seed=1), perturbed_model(config, seed=1)
    for m in (model, same):
        quantize_model(m, "int8")
    assert weights_digest(model) == weights_digest(same)
    layer = next(m for m in same.modules() if isinstance(m, QuantizedLinear))
    buffer = next(b for b in layer.buffers() if b.numel() > 8)
    with torch.no_grad():
        buffer.view(-1)[3] += 1                                  # one packed value of one layer
    assert weights_digest(model) != weights_digest(same)


def test_an_unreadable_session_file_is_skipped_with_a_log_line(tmp_path, caplog):
    disk = tier(tmp_path)
    disk.write([(block_hash(0), rows(0))])
    disk.write_session("t", "s", 5, [block_hash(0)])
    disk.flush()
    [path] = list(disk.sessions_dir.iterdir())
    for garbage in (b"{not json", b'{"format": 99}', b'{"format": 1, "blocks": "zz"}'):
        path.write_bytes(garbage)
        with caplog.at_level(logging.WARNING, logger="customllm.kv_disk"):
            other = tier(tmp_path)
        assert other.session("t", "s") is None and other.sessions("t") == []
        assert "skipping session file" in caplog.text
        caplog.clear()
        other.close()
    disk.close()


def test_rows_still_being_copied_are_waited_for_before_any_read(tmp_path):
    """On a GPU a save's rows arrive in pinned memory asynchronously: the writer, a read of a queued
    block and the host tier all call `ready` before touching them."""
    import threading

    from model.cache.host_tier import HostTier
    calls, gate = [], threading.Event()

    def ready():
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "kv-disk-writer":
            assert gate.wait(30)                       # the copy is slow: the block stays queued
    disk = tier(tmp_path)
    disk.write([(block_hash(0), rows(0))], ready=ready)
    assert torch.equal(disk.read(block_hash(0)), rows(0)) and threading.current_thread().name in calls
    assert disk.contains(block_hash(0)) and not disk.written(block_hash(0), look=True)   # queued, not written
    gate.set()
    assert disk.flush() and "kv-disk-writer" in calls and Path(disk.block_path(block_hash(0))).exists()
    assert disk.written(block_hash(0))
    host = HostTier(1 << 20)
    host.put(block_hash(1), rows(1), ready=lambda: calls.append("host"))
    assert torch.equal(host.get(block_hash(1)), rows(1)) and calls[-1] == "host"
    disk.close()
