"""The disk tier through the engine (tiny model, float32, greedy): a session continued by another
engine over the same directory is warm and gives the cold run's tokens and logprobs; restores run
while other requests decode; bad files and a full disk cost only the cache; the size bound holds
under a flood of sessions."""
from __future__ import annotations

import asyncio
import errno
import os
import threading
import time

import pytest

from model.cache import block_file
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.results import NullObserver
from tests.helpers import TierEvents, collect, tiny_engine

BS = 4
PROMPT = [(7 * i) % 250 + 1 for i in range(58)]     # + 6 generated: 15 full blocks computed and pinned
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5)


class Events(TierEvents, NullObserver):
    """The tier events of an engine's observer (the rest of the observer does nothing)."""


def engine_on(directory, observer=None, **overrides):
    return tiny_engine(num_blocks=96, block_size=BS, observer=observer, kv_disk_dir=str(directory),
                       kv_disk_gib=overrides.pop("kv_disk_gib", 0.01), **overrides)


def run(engine, request_id, prompt, session=None, tenant="t", params=PARAMS):
    return asyncio.run(collect(engine, GenerationRequest(request_id, prompt, params, tenant=tenant,
                                                         session_id=session)))


def first_turn(directory, prompt=PROMPT):
    engine = engine_on(directory)
    try:
        outputs, _, tokens = run(engine, "turn1", prompt, session="chat")
        assert engine.kv.tiers.flush()
        return prompt + tokens + [3, 5, 8]                  # the next turn's prompt
    finally:
        engine.stop()


def assert_same(warm, cold, tol=1e-5):
    warm_lps = [lp for o in warm[0] for lp in o.logprobs]
    cold_lps = [lp for o in cold[0] for lp in o.logprobs]
    assert warm[2] == cold[2] and len(warm_lps) == len(cold_lps)
    for w, c in zip(warm_lps, cold_lps):
        assert w.token_id == c.token_id and max(abs(a - b) for (_, a), (_, b) in zip(w.top, c.top)) <= tol


@pytest.fixture(scope="module")
def cold_runs():
    """Greedy outputs of prompts computed from nothing, for comparison."""
    engine = tiny_engine(num_blocks=96, block_size=BS)
    cache = {}

    def cold(prompt):
        key = tuple(prompt)
        if key not in cache:
            cache[key] = run(engine, f"cold{len(cache)}", prompt, tenant="cold")
            assert cache[key][0][-1].usage.cached_tokens == 0
        return cache[key]
    yield cold
    engine.stop()


def test_another_engine_over_the_directory_continues_the_session_warm_and_exact(tmp_path, cold_runs):
    turn2 = first_turn(tmp_path)
    events = Events()
    second = engine_on(tmp_path, events)
    try:
        [listed] = second.kv.list_sessions("t")
        assert listed.session_id == "chat" and listed.num_pinned_blocks == 0 and listed.num_disk_blocks == 15
        warm = run(second, "turn2", turn2, session="chat")
        usage = warm[0][-1].usage
        assert usage.cached_tokens == 15 * BS              # every full block of turn 1, read from disk
        assert_same(warm, cold_runs(turn2))
        assert events.count("hit_blocks") == 15 and events.count("read_bytes") == 15 * second.kv.tiers.disk.file_size
        assert events.count("restore_seconds") > 0 and events.count("misses") == 0
        assert run(second, "stranger", turn2, tenant="other")[0][-1].usage.cached_tokens == 0   # tenant-salted
        second.flush_inbox()
        second.check_integrity()
    finally:
        second.stop()


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_a_bad_file_in_the_run_costs_only_the_blocks_from_it_on(tmp_path, cold_runs, damage):
    turn2 = first_turn(tmp_path)
    events = Events()
    second = engine_on(tmp_path, events)
    try:
        manifest = second.kv.tiers.session("t", "chat")
        path = second.kv.tiers.disk.block_path(manifest.block_hashes[5])
        data = bytearray(open(path, "rb").read())
        if damage == "truncate":
            data = data[:-100]
        elif damage == "flip":
            data[block_file.HEADER.size + 10] ^= 1
        else:
            data[16:48] = bytes(32)                            # another model's fingerprint
        with open(path, "wb") as f:
            f.write(data)
        warm = run(second, "turn2", turn2, session="chat")
        assert warm[0][-1].usage.cached_tokens == 5 * BS        # blocks 0..4; 5 on is computed
        assert_same(warm, cold_runs(turn2))
        reason = {"truncate": "truncated", "flip": "wrong-checksum", "foreign": "foreign-model"}[damage]
        assert events.count("invalid_files", reason) == 1
    finally:
        second.stop()


def gated_disk_reads(engine, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make the engine's disk reads wait for `gate`; `reading` is set when the first one starts."""
    gate, reading = threading.Event(), threading.Event()
    read = engine.kv.tiers.disk.read

    def slow_read(block_hash):
        reading.set()
        assert gate.wait(60)
        return read(block_hash)
    monkeypatch.setattr(engine.kv.tiers.disk, "read", slow_read)
    return gate, reading


def test_other_requests_keep_decoding_while_a_session_is_restored(tmp_path, monkeypatch, cold_runs):
    turn2 = first_turn(tmp_path)
    second = engine_on(tmp_path)
    gate, reading = gated_disk_reads(second, monkeypatch)
    long_params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    produced: list[int] = []

    async def scenario():
        async def long_request():
            async for out in second.generate(GenerationRequest("long", [9, 9, 9], long_params, tenant="x")):
                produced.extend(out.token_ids)
        task = asyncio.create_task(long_request())
        while not produced:
            await asyncio.sleep(0.005)
        session_turn = asyncio.create_task(collect(second, GenerationRequest("turn2", turn2, PARAMS, tenant="t",
                                                                             session_id="chat")))
        deadline = time.monotonic() + 60
        while not reading.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert reading.is_set()
        before = len(produced)
        while len(produced) < before + 5 and time.monotonic() < deadline:    # decoding goes on meanwhile
            await asyncio.sleep(0.005)
        assert len(produced) >= before + 5 and not session_turn.done()
        gate.set()
        warm = await session_turn
        await task
        return warm
    try:
        warm = asyncio.run(scenario())
        assert warm[0][-1].usage.cached_tokens == 15 * BS and len(produced) == 40
        assert_same(warm, cold_runs(turn2))
    finally:
        gate.set()
        second.stop()


def test_an_abort_while_restoring_releases_everything(tmp_path, monkeypatch):
    turn2 = first_turn(tmp_path)
    second = engine_on(tmp_path)
    gate, reading = gated_disk_reads(second, monkeypatch)
    try:
        outputs = []
        second.submit(GenerationRequest("turn2", turn2, PARAMS, tenant="t", session_id="chat"), outputs.append)
        assert reading.wait(60)
        second.abort("turn2")
        second.flush_inbox()
        assert outputs and outputs[-1].finish_reason == "abort" and second.num_requests == 0
        gate.set()
        second.check_integrity()
        assert second.kv.pool.num_used_blocks == second.kv.num_pinned_blocks
    finally:
        gate.set()
        second.stop()


def test_a_full_disk_costs_the_tier_never_a_request(tmp_path, monkeypatch, cold_runs):
    events = Events()
    engine = engine_on(tmp_path, events)
    real_open = os.open

    def no_space(path, flags, mode=0o777, **kwargs):
        if str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, mode, **kwargs)
    monkeypatch.setattr(os, "open", no_space)
    try:
        for i in range(3):
            outputs, _, _ = run(engine, f"r{i}", PROMPT[: 20 + i], session=f"s{i}")
            assert outputs[-1].finish_reason == "length"
        assert engine.kv.tiers.flush()
        assert events.count("write_error") == 1 and not engine.kv.tiers.disk.writable
        assert engine.kv.get_session("t", "s2").num_pinned_blocks == 6       # (22 + 6 tokens, 27 computed)
    finally:
        engine.stop()


def test_the_disk_bound_holds_under_a_flood_of_sessions(tmp_path):
    bound_gib = 0.0002                          # ~215 KB: ~130 block files of 1,628 bytes, of ~600 written
    events = Events()
    engine = engine_on(tmp_path, events, kv_disk_gib=bound_gib, max_sessions=8)
    file_size = engine.kv.tiers.disk.file_size
    bound = int(bound_gib * 1024 ** 3)
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            total = 0
            for root, _, files in os.walk(tmp_path):
                for name in files:
                    try:
                        total += os.stat(os.path.join(root, name)).st_size
                    except FileNotFoundError:
                        pass
            peak[0] = max(peak[0], total)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

        async def flood():
            return await asyncio.gather(*(collect(engine, GenerationRequest(
                f"f{i}", [(i * 13 + j) % 250 + 1 for j in range(40)], params, tenant="t", session_id=f"s{i}"))
                for i in range(60)))
        results = asyncio.run(flood())
        assert [r[0][-1].finish_reason for r in results] == ["length"] * 60 and engine.alive
        assert engine.kv.tiers.flush()
        engine.flush_inbox()
        engine.check_integrity()
    finally:
        stop.set()
        watcher.join(30)
        engine.stop()
    written = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path) for f in fs)
    assert 0 < written <= bound and peak[0] <= bound + file_size, (peak[0], bound, file_size)
    assert engine.kv.tiers.disk.bytes_used == written
    assert events.count("written_bytes") > 3 * bound             # written several times over: evicting
