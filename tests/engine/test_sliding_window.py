"""A sliding window in the cache: blocks wholly behind a running sequence's window are released while
it decodes, so a long generation holds about the window plus a block; prefix hits and session turns
need only the cached blocks their own window reaches, and still equal the full-sequence forward."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from model.cache.block_pool import RELEASED, BlockPool
from model.cache.block_table import held
from model.config import preset
from server.engine.request import GenerationRequest, SamplingParams
from tests.helpers import collect, roomy_and_tight_runs, tiny_engine

BLOCK = 4


# ---- the pool's windowed lookup ------------------------------------------------------------------
def cached_chain(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Cache every full block of `tokens` in fresh blocks, then free them (they stay findable)."""
    hashes = pool.hash_prefix_blocks(tokens, "t")
    blocks = pool.allocate(len(hashes))
    for block, block_hash in zip(blocks, hashes):
        pool.cache_block(block, block_hash)
    pool.release(blocks)
    return blocks


def evict(pool: BlockPool, block: int) -> None:
    """Evict exactly `block`'s cached prefix, leaving the others."""
    pool.acquire([block])
    pool.release([block])                        # now last in the LRU order ...
    pool.free_queue.move_to_end(block, last=False)
    taken = pool.allocate(1)                     # ... moved first, so it is the one evicted
    assert taken == [block]
    pool.release(taken)


def test_without_a_window_a_hit_needs_the_whole_chain():
    pool = BlockPool(16, BLOCK)
    tokens = list(range(1, 26))                 # 6 full blocks
    blocks = cached_chain(pool, tokens)
    assert pool.lookup_prefix(tokens, "t") == blocks
    evict(pool, blocks[0])
    assert pool.lookup_prefix(tokens, "t") == []
    pool.check_integrity([])


def test_with_a_window_a_hit_needs_only_the_blocks_its_window_reaches():
    pool = BlockPool(16, BLOCK)
    tokens = list(range(1, 26))                 # 6 full blocks: positions 0..23
    blocks = cached_chain(pool, tokens)
    window = 6
    # all cached: a hit of 6 blocks computes position 24 next, which sees 18..24: blocks 4 and 5
    assert pool.lookup_prefix(tokens, "t", window=window) == [RELEASED] * 4 + blocks[4:]
    for gone in blocks[:4]:                      # the blocks behind that window may be evicted
        evict(pool, gone)
    assert pool.lookup_prefix(tokens, "t", window=window) == [RELEASED] * 4 + blocks[4:]
    # a window edge on a block boundary: position 24 - 8 = 16 is block 4's first row
    assert pool.lookup_prefix(tokens, "t", window=8) == [RELEASED] * 4 + blocks[4:]
    # a wider window reaches block 3, which is gone; so do shorter hits' windows: no hit at all
    assert pool.lookup_prefix(tokens, "t", window=9) == []
    # a hole: evict block 4 too; block 5 alone serves a window of at most 3 from position 24
    evict(pool, blocks[4])
    assert pool.lookup_prefix(tokens, "t", window=3) == [RELEASED] * 5 + blocks[5:]
    assert pool.lookup_prefix(tokens, "t", window=4) == [RELEASED] * 5 + blocks[5:]   # sees 20..24
    assert pool.lookup_prefix(tokens, "t", window=5) == []                            # sees 19: block 4
    pool.check_integrity([])


def test_first_needed_block():
    assert BlockPool.first_needed_block(100, BLOCK, None) == 0
    assert BlockPool.first_needed_block(5, BLOCK, 8) == 0
    assert BlockPool.first_needed_block(16, BLOCK, 8) == 2       # sees 8..16: block 2 onward
    assert BlockPool.first_needed_block(17, BLOCK, 8) == 2       # sees 9..17: block 2 holds 8..11
    assert BlockPool.first_needed_block(20, BLOCK, 8) == 3


# ---- through the engine --------------------------------------------------------------------------
def windowed_config(window: int):
    return preset("smart-llm-tiny").replace(sliding_window_size=window)


def oracle_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(num_tokens):
            seq.append(int(model.forward_full(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class HeldBlocks:
    """Wraps the scheduler's `schedule` to record the most blocks any running request held."""

    def __init__(self, scheduler):
        self.peak = 0
        self._schedule = scheduler.schedule
        scheduler.schedule = self

    def __call__(self):
        out = self._schedule()
        for chunk in out.chunks:
            self.peak = max(self.peak, len(held(chunk.seq.block_ids)))
        return out


@pytest.mark.parametrize("window", [8, 10])     # the window's edge on a block boundary, and inside a block
def test_a_long_generation_holds_about_the_window(window):
    prompt_len, max_tokens = 9, 70
    # 12 blocks = 48 tokens of cache: far less than the 79 tokens of the request
    engine = tiny_engine(config=windowed_config(window), num_blocks=12, block_size=BLOCK, std=0.2,
                         max_num_batched_tokens=16)
    peak = HeldBlocks(engine.core.scheduler)
    try:
        prompt = [(7 * i + 5) % 512 for i in range(prompt_len)]
        _, _, tokens = asyncio.run(collect(engine, GenerationRequest("long", prompt, greedy(max_tokens))))
        assert tokens == oracle_greedy(engine.model, prompt, max_tokens)
        last_step_start = prompt_len + max_tokens - 2
        expected_released = BlockPool.first_needed_block(last_step_start, BLOCK, window)
        assert engine.kv.num_window_released_blocks == expected_released > 10
        # decode at p holds the blocks of p-W .. p: W+1 positions, over at most this many blocks
        assert peak.peak <= -(-(window + 1) // BLOCK) + 1
        engine.flush_inbox()
        engine.check_integrity()
        assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks
    finally:
        engine.stop()


@pytest.fixture
def engine():
    """A started engine over smart-llm-tiny with a 6-token window, 64 blocks of 4."""
    engine = tiny_engine(config=windowed_config(6), num_blocks=64, block_size=BLOCK, std=0.2)
    yield engine
    engine.stop()


def test_a_prefix_hit_under_the_window_equals_the_oracle(engine):
    prompt = [(11 * i + 3) % 512 for i in range(30)]
    first, _, first_tokens = asyncio.run(collect(engine, GenerationRequest("a", prompt, greedy(5))))
    assert first[-1].usage.cached_tokens == 0
    follow_up = prompt + first_tokens + [9, 8, 7]
    out, _, tokens = asyncio.run(collect(engine, GenerationRequest("b", follow_up, greedy(12))))
    # the first request computed 34 positions (its last token never is): 8 full blocks cached
    assert out[-1].usage.cached_tokens == 32
    assert tokens == oracle_greedy(engine.model, follow_up, 12)
    engine.flush_inbox()
    engine.check_integrity()


def test_session_turns_under_the_window_pin_only_what_the_window_needs(engine):
    window = engine.core.window
    history = [(13 * i + 1) % 512 for i in range(21)]
    for turn in range(3):
        request = GenerationRequest(f"turn-{turn}", list(history), greedy(10), tenant="alice",
                                    session_id="s1")
        out, _, tokens = asyncio.run(collect(engine, request))
        assert tokens == oracle_greedy(engine.model, history, 10)
        if turn:
            assert out[-1].usage.cached_tokens >= window
        history += tokens + [100 + turn, 200 + turn]
        engine.flush_inbox()
        engine.check_integrity()
        # the pin holds the blocks the next turn's window reaches, not the whole history, and says so
        assert engine.kv.sessions.num_pinned_blocks <= -(-window // BLOCK) + 2
        info = engine.kv.sessions.get("alice", "s1")
        assert info.bytes == info.num_pinned_blocks * BLOCK * engine.cache.bytes_per_token
        assert info.num_tokens > info.num_pinned_blocks * BLOCK


def test_a_request_longer_than_the_cache_is_admitted_only_with_a_window():
    prompt = [(3 * i + 1) % 512 for i in range(8)]
    request = GenerationRequest("r", prompt, greedy(100))
    windowed = tiny_engine(config=windowed_config(8), num_blocks=12, block_size=BLOCK, max_num_batched_tokens=16)
    unwindowed = tiny_engine(config=preset("smart-llm-tiny").replace(use_sliding_window_attention=False),
                             num_blocks=12, block_size=BLOCK, max_num_batched_tokens=16)
    try:
        windowed.validate_request(request)
        with pytest.raises(ValueError, match="KV cache"):
            unwindowed.validate_request(request)
    finally:
        windowed.stop()
        unwindowed.stop()


def test_preemption_under_the_window_keeps_outputs_exact():
    """A pool too small for every request at once: preempted requests resume through windowed prefix
    hits (their early blocks may be gone) and still produce the roomy cache's greedy tokens."""
    prompts = [[(7 * i + j) % 400 + 1 for j in range(10 + 5 * i)] for i in range(6)]
    expected, got, tight = roomy_and_tight_runs(prompts, max_tokens=30, tight_blocks=14, config=windowed_config(6),
                                                std=0.2, max_num_batched_tokens=16)
    assert tight.num_preemptions > 0 and tight.kv.num_window_released_blocks > 0
    assert got == expected


def test_random_traffic_with_sessions_and_aborts_leaks_nothing():
    engine = tiny_engine(config=windowed_config(6), num_blocks=40, block_size=BLOCK, std=0.2,
                         max_num_batched_tokens=32, max_num_seqs=8, max_sessions=4)
    rng = random.Random(7)
    shared = [rng.randrange(1, 500) for _ in range(24)]

    async def one(i):
        prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(1, 500) for _ in range(rng.randrange(1, 40))]
        session = f"s{rng.randrange(6)}" if rng.random() < 0.4 else None
        params = SamplingParams(max_tokens=rng.randrange(1, 40), temperature=rng.choice([0, 1.0]), ignore_eos=True)
        gen = engine.generate(GenerationRequest(f"r{i}", prompt, params, tenant=rng.choice(["a", "b"]),
                                                session_id=session))
        abort_after = rng.choice([None, None, 0, 2])
        count = 0
        async for out in gen:
            count += 1
            if abort_after is not None and count > abort_after:
                await gen.aclose()
                return "aborted"
        return out.finish_reason

    async def main():
        return await asyncio.gather(*(one(i) for i in range(120)))

    try:
        reasons = asyncio.run(main())
        assert set(reasons) <= {"length", "aborted", "abort"} and len(reasons) == 120
        engine.flush_inbox()
        engine.check_integrity()
        pinned = {block for held in engine.kv.sessions.holders() for block in held}
        assert engine.kv.pool.num_used_blocks == len(pinned) and engine.num_requests == 0
        assert engine.kv.num_window_released_blocks > 0
    finally:
        engine.stop()
