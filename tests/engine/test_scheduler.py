"""Scheduler scenarios with exact expectations; integrity checked after each (no model needed)."""
from __future__ import annotations

from model.cache.kv_manager import KVCacheManager
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.request import GenerationRequest, SamplingParams

BS = 4


def make_scheduler(num_blocks=16, max_seqs=8, budget=16):
    kv = KVCacheManager(num_blocks, BS, max_sessions=8, idle_ttl_s=60, max_pinned_fraction=0.5)
    return Scheduler(kv, max_num_seqs=max_seqs, max_num_batched_tokens=budget)


def make_seq(rid: str, prompt_len: int, tenant: str = "", first_token: int = 1, session=None) -> Sequence:
    request = GenerationRequest(rid, list(range(first_token, first_token + prompt_len)), SamplingParams(max_tokens=50),
                                tenant=tenant, session_id=session)
    return Sequence(request, emit=lambda out: None)


def run_step(sched: Scheduler, sample_token: int = 7):
    """Apply a schedule as the engine would: advance computed tokens, register blocks, append a
    token to every sequence whose known tokens are all computed."""
    out = sched.schedule()
    for chunk in out.chunks:
        chunk.seq.num_computed_tokens += chunk.num_tokens
        sched.register_full_blocks(chunk.seq)
        if chunk.completes_prompt:
            chunk.seq.output_token_ids.append(sample_token)
    sched.check_integrity()
    return out


def plan(out):
    return [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks]


def test_budget_respected_and_chunked_prefill_interleaves_with_decodes():
    sched = make_scheduler(num_blocks=32, budget=8)
    a = make_seq("a", 3)
    sched.add(a)
    assert plan(run_step(sched)) == [("a", 0, 3)]
    b = make_seq("b", 20, first_token=100)
    sched.add(b)
    # a decodes one token; b prefills in chunks of what is left of the budget
    assert plan(run_step(sched)) == [("a", 3, 1), ("b", 0, 7)]
    assert plan(run_step(sched)) == [("a", 4, 1), ("b", 7, 7)]
    assert plan(run_step(sched)) == [("a", 5, 1), ("b", 14, 6)]
    assert plan(run_step(sched)) == [("a", 6, 1), ("b", 20, 1)]
    for out in (run_step(sched) for _ in range(3)):
        assert out.num_tokens <= 8


def test_max_num_seqs_limits_running():
    sched = make_scheduler(num_blocks=32, max_seqs=2, budget=100)
    for i in range(3):
        sched.add(make_seq(f"r{i}", 2, first_token=10 * i + 1))
    assert [c.seq.request_id for c in run_step(sched).chunks] == ["r0", "r1"]
    assert [s.request_id for s in sched.waiting] == ["r2"]


def test_preemption_of_newest_and_resume_with_prefix_reuse():
    sched = make_scheduler(num_blocks=6, budget=64)
    old, new = make_seq("old", 8, first_token=1), make_seq("new", 8, first_token=50)
    sched.add(old)
    sched.add(new)
    run_step(sched)                      # both prefilled: 2 blocks each, 2 free
    for _ in range(4):                   # decode until old needs a 4th block and new a 4th
        out = run_step(sched)
    # 6 blocks: old holds 3, new held 3 and had to give way for old's next block
    while not out.preempted:
        out = run_step(sched)
    assert [s.request_id for s in out.preempted] == ["new"]
    assert sched.waiting.peek() is new and new.num_computed_tokens == 0 and new.block_ids == []
    assert sched.num_preemptions == 1
    sched.finish(old)
    sched.check_integrity()
    out = run_step(sched)
    # resumed: its full blocks were still cached, only the rest is recomputed
    (chunk,) = out.chunks
    assert chunk.seq is new and chunk.start > 0 and chunk.start % BS == 0
    assert new.num_cached_prompt_tokens == 0  # the cached-token figure is from its first admission


def test_abort_mid_prefill_and_mid_decode_frees_everything():
    sched = make_scheduler(num_blocks=16, budget=4)
    a = make_seq("a", 10)
    sched.add(a)
    run_step(sched)                      # a is mid-prefill (4 of 10)
    assert 0 < a.num_computed_tokens < a.num_tokens
    sched.finish(a)
    sched.check_integrity()
    assert sched.kv.pool.num_used_blocks == 0
    b = make_seq("b", 3, first_token=40)
    sched.add(b)
    run_step(sched)
    run_step(sched)                      # b is decoding
    sched.finish(b)
    sched.check_integrity()
    assert sched.kv.pool.num_used_blocks == 0 and not sched.has_work()


def test_prefix_hit_is_tenant_scoped_and_leaves_one_token_to_compute():
    sched = make_scheduler(num_blocks=32, budget=64)
    first = make_seq("first", 8, tenant="alice")
    sched.add(first)
    run_step(sched)
    sched.finish(first)
    same = make_seq("same", 8, tenant="alice")
    other = make_seq("other", 8, tenant="bob")
    sched.add(same)
    sched.add(other)
    out = run_step(sched)
    starts = {c.seq.request_id: c.start for c in out.chunks}
    assert starts == {"same": 4, "other": 0}   # 8 tokens = 2 full blocks; the last block is recomputed
    assert same.num_cached_prompt_tokens == 4 and other.num_cached_prompt_tokens == 0


def test_session_pin_survives_pressure_until_needed():
    sched = make_scheduler(num_blocks=8, budget=64)
    turn1 = make_seq("t1", 8, tenant="t", session="s")
    sched.add(turn1)
    run_step(sched)
    run_step(sched)
    sched.finish(turn1)
    assert sched.kv.sessions.num_sessions == 1
    sched.check_integrity()
    big = make_seq("big", 28, first_token=200)      # needs 7 of 8 blocks: the pin must go
    sched.add(big)
    out = run_step(sched)
    assert plan(out) == [("big", 0, 28)]
    assert sched.kv.sessions.num_sessions == 0
