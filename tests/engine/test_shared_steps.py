"""Shared steps (server/engine/shared_steps.py): while tenants compete, a step computes at most
max(fair_step_tokens, tenants × the lightest tenant's requests) tokens, shared equally across them;
a light tenant's requests advance every step beside a flood, the flood's requests take turns, what a
tenant leaves goes to admissions and then to anyone, and outputs are those of ordinary steps."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from server.engine.request import GenerationRequest, SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.shared_steps import LINGER_S, PREFILL_BOOST, shared_step_cap, tenant_parts
from tests.engine.test_fairness import seq
from tests.engine.test_overlap import _summary, assert_same
from tests.engine.test_scheduler import BS, run_step
from tests.helpers import tiny_engine

from model.cache.kv_manager import KVCacheManager


def shared_scheduler(num_blocks=64, max_seqs=16, budget=64, fair=4) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, max_sessions=8, idle_ttl_s=60, max_pinned_fraction=0.5)
    return Scheduler(kv, max_num_seqs=max_seqs, max_num_batched_tokens=budget, fair_step_tokens=fair)


def decode_all(sched: Scheduler) -> None:
    """Steps until every request has its prompt computed (each request then decodes)."""
    for _ in range(50):
        if all(s.num_computed_tokens >= len(s.prompt_token_ids) for s in sched.running) and not sched.waiting:
            return
        run_step(sched)
    raise AssertionError("prompts never finished")


def flood_and_light_decoding(sched: Scheduler, num_flood: int) -> tuple[list, object]:
    """Tenant B's `num_flood` requests and tenant A's one, added in that order, all decoding."""
    flood = [seq(f"b{i}", "B", prompt_len=2) for i in range(num_flood)]
    for s in flood:
        sched.add(s)
    light = seq("a", "A", prompt_len=2)
    sched.add(light)
    decode_all(sched)
    return flood, light


def test_the_cap_is_off_for_one_tenant_and_follows_the_lightest_tenant():
    assert shared_step_cap(Counter({"B": 60}), 4) is None
    assert shared_step_cap(Counter({"A": 1, "B": 60}), 0) is None
    assert shared_step_cap(Counter({"A": 1, "B": 60}), 4) == 4
    assert shared_step_cap(Counter({"A": 5, "B": 60}), 4) == 10          # two tenants × the lightest's 5
    assert shared_step_cap(Counter({"A": 1, "B": 60, "C": 2}), 4) == 4
    assert shared_step_cap(Counter({"A": 5, "B": 60}), 4, num_lingering=1) == 4     # C lingers with none
    assert shared_step_cap(Counter({"B": 60}), 4, num_lingering=1) == 4
    assert shared_step_cap(Counter(), 4, num_lingering=1) is None


def test_a_tenant_lingers_after_its_last_request_and_one_alone_never_shares():
    sched = shared_scheduler()
    now = [0.0]
    sched.clock = lambda: now[0]
    a = seq("a", "A")
    sched.add(a)
    run_step(sched)
    sched.finish(a)
    assert sched.lingering == {"A": 0.0} and sched.shared_step_cap() is None    # nobody else: no sharing
    sched.add(seq("a2", "A"))
    assert not sched.lingering                   # back with a request: it competes as any tenant
    sched.finish(sched.waiting.peek())
    b = seq("b", "B")
    sched.add(b)
    now[0] = LINGER_S / 2
    assert sched.shared_step_cap() == 4
    now[0] = 1.5 * LINGER_S
    assert sched.shared_step_cap() is None and not sched.lingering


def test_tenant_parts_divide_the_cap_equally_and_rotate_the_remainder():
    assert tenant_parts(["A", "B"], 4, 0) == [("A", 2), ("B", 2)]
    assert tenant_parts(["A", "B", "C"], 4, 0) == [("A", 2), ("B", 1), ("C", 1)]
    assert tenant_parts(["A", "B", "C"], 4, 1) == [("B", 2), ("C", 1), ("A", 1)]
    assert sum(part for _, part in tenant_parts(["A", "B", "C"], 7, 5)) == 7


def test_a_light_tenant_advances_every_step_beside_a_flood_whose_requests_take_turns():
    sched = shared_scheduler()
    flood, light = flood_and_light_decoding(sched, 10)
    for _ in range(10):
        run_step(sched)                         # past the turns the admissions one by one left uneven
    advanced = Counter()
    for _ in range(20):
        before = {id(s): s.num_computed_tokens for s in sched.running}
        out = run_step(sched)
        assert out.num_tokens <= 4                                  # the cap: max(4, 2 tenants × 1)
        assert light in [c.seq for c in out.chunks]                 # A's one request: every step
        assert out.num_decodes == len(out.chunks)
        for chunk in out.chunks:
            assert chunk.start == before[id(chunk.seq)]
            advanced[chunk.seq.request_id] += 1
    # B's part (2 of the 4 tokens, plus the one A leaves) went round its 10 requests in turn
    flood_counts = [advanced[s.request_id] for s in flood]
    assert sum(flood_counts) == 20 * 3 and max(flood_counts) - min(flood_counts) <= 1
    assert sched.num_shared_steps > 0
    sched.check_integrity()


def test_balanced_tenants_share_every_step_as_before():
    """Four requests each: the cap (2 × 4 = 8) holds them all, so every request advances every step."""
    sched = shared_scheduler()
    requests = [seq(f"{t}{i}", t, prompt_len=2) for t in "AB" for i in range(4)]
    for s in requests:
        sched.add(s)
    decode_all(sched)
    for _ in range(5):
        out = run_step(sched)
        assert sorted(c.seq.request_id for c in out.chunks) == sorted(s.request_id for s in requests)


def test_what_a_tenant_leaves_goes_to_admissions_then_to_anyone():
    sched = shared_scheduler(max_seqs=16, fair=6)
    flood, light = flood_and_light_decoding(sched, 8)
    late = seq("b-late", "B", prompt_len=2)
    sched.add(late)
    out = run_step(sched)
    # cap 6: A takes 1 of its 3, B 3; the 2 left admit B's waiting request (its 2-token prompt)
    assert late in [c.seq for c in out.chunks] and out.num_tokens == 6
    now = [100.0]
    sched.clock = lambda: now[0]
    sched.finish(light)                         # A lingers: B's steps stay short for its next request
    assert sched.shared_step_cap() == 6
    out = run_step(sched)
    assert out.num_tokens == 6 and len(sched.running) == 9
    now[0] += LINGER_S                          # then one tenant is left: ordinary steps, every request
    assert sched.shared_step_cap() is None and not sched.lingering
    shared_so_far = sched.num_shared_steps
    out = run_step(sched)
    assert len(out.chunks) == len(sched.running) == 9 and sched.num_shared_steps == shared_so_far
    sched.check_integrity()


def test_a_shared_step_short_of_blocks_preempts_and_keeps_the_cache_whole():
    """Few blocks: making room preempts the newest running requests, possibly ones already given a
    chunk in this step; those chunks are dropped and nothing leaks."""
    sched = shared_scheduler(num_blocks=6, max_seqs=8, fair=4)
    requests = [seq(f"b{i}", "B", prompt_len=3) for i in range(4)] + [seq("a", "A", prompt_len=3)]
    for s in requests:
        sched.add(s)
    preempted = 0
    for _ in range(40):
        out = run_step(sched)
        preempted += len(out.preempted)
        assert all(c.seq in sched.running for c in out.chunks)
        assert not set(map(id, out.preempted)) & {id(c.seq) for c in out.chunks}
    assert preempted > 0
    for s in list(sched.running) + list(sched.waiting):
        sched.finish(s)
    assert sched.kv.pool.num_used_blocks == 0 and not sched.tenant_requests


def _two_tenant_run(fair_step_tokens: int, overlap: bool) -> dict:
    engine = tiny_engine(num_blocks=256, fair_step_tokens=fair_step_tokens, overlap_steps=overlap, max_num_seqs=16)
    try:
        async def one(i: int, tenant: str):
            params = SamplingParams(max_tokens=6 + 2 * i, temperature=0.8 if i % 3 == 0 else 0.0, seed=i,
                                    logprobs=1, ignore_eos=True)
            prompt = [3 + (7 * i + k) % 150 for k in range(2 + i)]
            request = GenerationRequest(f"{tenant}{i}", prompt, params, tenant=tenant)
            outputs = [out async for out in engine.generate(request)]
            text = "".join(o.text for o in outputs)
            return request.request_id, _summary((outputs, text, [t for o in outputs for t in o.token_ids]))

        async def main():
            jobs = [one(i, "B") for i in range(10)] + [one(i, "A") for i in range(2)]
            return dict(await asyncio.gather(*jobs))
        results = asyncio.run(main())
        engine.check_integrity()
        assert engine.kv.pool.num_used_blocks == 0
        return results, engine.core.scheduler.num_shared_steps
    finally:
        engine.stop()


@pytest.mark.parametrize("overlap", [False, True])
def test_shared_steps_give_the_outputs_of_ordinary_steps(overlap):
    """Greedy and seeded sampled requests of two tenants: the same texts, tokens and finish reasons
    with shared steps (and with the overlap pipeline on) as without."""
    expected, none_shared = _two_tenant_run(0, False)
    got, shared = _two_tenant_run(4, overlap)
    assert none_shared == 0 and shared > 0
    assert_same(got, expected)


def test_a_light_tenants_prompt_goes_in_larger_steps_until_it_decodes():
    """A's new 12-token prompt beside B's decoding flood: while no request of the lightest tenant
    decodes, the cap is PREFILL_BOOST times larger, so the prompt takes two steps, not six; once A
    decodes, steps are back to the cap."""
    sched = shared_scheduler(max_seqs=32, fair=4)
    flood = [seq(f"b{i}", "B", prompt_len=2) for i in range(12)]
    for s in flood:
        sched.add(s)
    decode_all(sched)                       # one tenant: ordinary steps
    light = seq("a", "A", prompt_len=12)
    sched.add(light)
    steps_to_first_token = 0
    while not light.output_token_ids:
        out = run_step(sched)
        steps_to_first_token += 1
        assert out.num_tokens <= 4 * PREFILL_BOOST
    assert steps_to_first_token == 2        # 8 of the 16 (its part), then the last 4
    for _ in range(5):
        out = run_step(sched)
        assert out.num_tokens <= 4 and light in [c.seq for c in out.chunks]


def test_fair_step_tokens_flag():
    """auto: CPU_FAIR_STEP_TOKENS on a CPU (off with CUDA); a number or 0 (off) as given; the value
    reaches the engine's configuration; anything else is refused."""
    from server.cli.main import build_parser
    from server.cli.serve import CPU_FAIR_STEP_TOKENS, config_from_args, fair_step_tokens_wanted
    assert fair_step_tokens_wanted("auto", "cpu") == CPU_FAIR_STEP_TOKENS == 4
    assert fair_step_tokens_wanted("0", "cpu") == 0 and fair_step_tokens_wanted("12", "cpu") == 12
    parse = build_parser().parse_args
    assert config_from_args(parse(["serve"])).engine.fair_step_tokens == 4
    assert config_from_args(parse(["serve", "--fair-step-tokens", "0"])).engine.fair_step_tokens == 0
    for bad in ("-1", "many"):
        with pytest.raises(ValueError, match="--fair-step-tokens"):
            config_from_args(parse(["serve", "--fair-step-tokens", bad]))
