"""Tenants take turns in the waiting queue, lower priority first within a tenant, preempted requests
resume first; one tenant's flood is capped by its own waiting limit, so another tenant is admitted
and scheduled within one turn; a full batch yields a slot to a tenant with nothing running when
another tenant holds more than its fair share."""
from __future__ import annotations

import threading

import pytest

from server.engine.errors import QueueFullError
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.sequence import Sequence
from server.engine.waiting import WaitingQueue
from tests.engine.test_scheduler import make_scheduler, run_step
from tests.helpers import tiny_engine


def seq(rid: str, tenant: str = "", priority: int = 0, prompt_len: int = 2) -> Sequence:
    return Sequence(GenerationRequest(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=4),
                                      tenant=tenant, priority=priority), emit=lambda out: None)


def drain(queue: WaitingQueue) -> list[str]:
    taken = []
    while queue:
        taken.append(queue.pop_head().request_id)
    return taken


def test_tenants_take_turns_whatever_their_queue_lengths():
    queue = WaitingQueue()
    for i in range(5):
        queue.append(seq(f"b{i}", "B"))
    queue.append(seq("a0", "A"))
    queue.append(seq("c0", "C"))
    queue.append(seq("a1", "A"))
    assert [s.request_id for s in queue] == ["b0", "a0", "c0", "b1", "a1", "b2", "b3", "b4"]
    assert len(queue) == 8 and queue.count("B") == 5
    assert drain(queue) == ["b0", "a0", "c0", "b1", "a1", "b2", "b3", "b4"]
    assert not queue and queue.peek() is None


def test_lower_priority_first_within_a_tenant_then_arrival():
    queue = WaitingQueue()
    for rid, priority in (("late-low", 5), ("urgent", -1), ("normal-1", 0), ("normal-2", 0)):
        queue.append(seq(rid, "A", priority))
    assert drain(queue) == ["urgent", "normal-1", "normal-2", "late-low"]


def test_a_preempted_request_resumes_first_and_removal_keeps_the_turns():
    queue = WaitingQueue()
    queue.append(seq("a0", "A"))
    b0, b1 = seq("b0", "B"), seq("b1", "B")
    queue.append(b0)
    queue.append(b1)
    preempted = seq("p", "B")
    queue.appendleft(preempted)
    assert queue.peek() is preempted
    queue.remove(b0)
    assert b0 not in queue and preempted in queue
    assert drain(queue) == ["p", "a0", "b1"]


def test_the_scheduler_admits_another_tenant_within_one_turn_of_a_flood():
    sched = make_scheduler(num_blocks=64, max_seqs=2, budget=64)
    flood = [seq(f"b{i}", "B") for i in range(20)]
    for s in flood:
        sched.add(s)
    run_step(sched)                                   # b0, b1 run; the rest wait
    a = seq("a", "A")
    sched.add(a)
    sched.finish(flood[0])                            # one slot frees up
    out = run_step(sched)
    assert a in [c.seq for c in out.chunks]           # A's turn comes before B's 18 others
    sched.check_integrity()


def test_a_full_batch_yields_a_slot_to_a_tenant_with_nothing_running():
    sched = make_scheduler(num_blocks=64, max_seqs=4, budget=64)
    flood = [seq(f"b{i}", "B") for i in range(8)]
    for s in flood:
        sched.add(s)
    run_step(sched)                                   # b0..b3 hold every slot
    a = seq("a", "A")
    sched.add(a)
    out = run_step(sched)                             # no B request has finished
    assert a in [c.seq for c in out.chunks]
    assert out.preempted == [flood[3]]                # B's newest running request yielded
    assert [s.request_id for s in sched.running] == ["b0", "b1", "b2", "a"]
    assert flood[3].num_computed_tokens == 0 and flood[3].num_preemptions == 1
    assert sched.waiting.peek() is flood[3]           # first of B's waiting requests
    run_step(sched)                                   # A now holds its one slot: nothing more yields
    assert len(sched.running) == 4 and a in sched.running
    sched.finish(a)
    out = run_step(sched)
    assert flood[3] in [c.seq for c in out.chunks]    # the request that yielded resumes first
    sched.check_integrity()


def test_no_slot_is_yielded_by_a_tenant_within_its_fair_share():
    sched = make_scheduler(num_blocks=64, max_seqs=2, budget=64)
    b, c = seq("b", "B"), seq("c", "C")
    sched.add(b)
    sched.add(c)
    run_step(sched)
    sched.add(seq("a", "A"))
    out = run_step(sched)                             # B and C hold one slot each: A waits its turn
    assert not out.preempted and sched.running == [b, c]


def test_a_request_that_yielded_keeps_its_tenants_place_in_the_turns():
    queue = WaitingQueue()
    queue.append(seq("a0", "A"))
    queue.append(seq("b0", "B"))
    yielded = seq("c-yielded", "C")
    queue.appendleft(yielded, resume_next=False)      # C had nothing waiting: it goes last
    assert queue.tenants() == ["A", "B", "C"]
    queue.append(seq("c1", "C"))
    assert drain(queue) == ["a0", "b0", "c-yielded", "c1"]


def test_one_tenant_at_its_waiting_limit_leaves_room_for_another():
    engine = tiny_engine(max_num_seqs=1, max_waiting_requests=8, max_waiting_per_tenant=3, start=False)
    try:
        params = SamplingParams(max_tokens=2)
        for i in range(3):
            engine.core.admit(GenerationRequest(f"b{i}", [1, 2], params, tenant="B"), lambda out: None, i)
        with pytest.raises(QueueFullError, match="this tenant"):
            engine.core.admit(GenerationRequest("b3", [1, 2], params, tenant="B"), lambda out: None, 3)
        engine.core.admit(GenerationRequest("a0", [1, 2], params, tenant="A"), lambda out: None, 3)
        assert engine.core.num_waiting_of("B") == 3 and engine.core.num_waiting_of("A") == 1
    finally:
        engine.stop()


def test_priority_reaches_the_engine_and_orders_a_tenants_requests():
    engine = tiny_engine(max_num_seqs=1)
    try:
        finished: list[str] = []
        done = threading.Event()
        first_token = threading.Event()

        def submit(rid: str, priority: int, max_tokens: int = 3) -> None:
            def emit(out):
                if out.token_ids:
                    first_token.set()
                if out.finished:
                    finished.append(rid)
                    if len(finished) == 4:
                        done.set()
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            engine.submit(GenerationRequest(rid, [3, 4, 5], params, priority=priority), emit)

        submit("first", 0, max_tokens=8)
        assert first_token.wait(30)                   # running: it holds the only slot
        with engine.core.lock:                        # the loop cannot schedule until all three wait
            for rid, priority in (("low", 9), ("high", -5), ("mid", 0)):
                submit(rid, priority)
        assert done.wait(60)
        assert finished == ["first", "high", "mid", "low"]
    finally:
        engine.stop()
