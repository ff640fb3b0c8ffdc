"""The thread governor (server/executor/thread_governor.py): torch's thread count follows the cores
other processes leave free while the engine works, after two windows that agree; /proc/stat is read
per CPU of the mask, interrupt and softirq time not counted as other processes'."""
from __future__ import annotations

import threading
from pathlib import Path

from model.layers.cpu_load import read_cpu_jiffies
from server.executor.thread_governor import ThreadGovernor, threads_for

HZ_STAT = """cpu  100 0 50 800 50 0 0 0 0 0
cpu0 60 0 30 400 10 0 0 0 0 0
cpu1 40 0 20 400 40 0 0 0 0 0
intr 12345
ctxt 999
"""


def test_proc_stat_is_summed_over_the_mask_busy_without_idle_and_iowait(tmp_path: Path):
    stat = tmp_path / "stat"
    stat.write_text(HZ_STAT)
    assert read_cpu_jiffies(None, stat) == (150, 1000)
    assert read_cpu_jiffies({0}, stat) == (90, 500)
    assert read_cpu_jiffies({1}, stat) == (60, 500)
    assert read_cpu_jiffies({0, 1}, stat) == (150, 1000)
    assert read_cpu_jiffies(None, tmp_path / "missing") is None


def test_interrupt_and_softirq_time_is_not_counted_busy(tmp_path: Path):
    """A loopback's packets are processed in softirq time: mostly the server's own traffic, which
    fewer threads would not avoid. Steal time (a hypervisor's other guests) is counted."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 50 30 70 5 0 0\ncpu0 100 0 50 800 50 30 70 5 0 0\n")
    assert read_cpu_jiffies({0}, stat) == (155, 1105)


def test_threads_fit_the_cores_left():
    assert threads_for(0.0, 2, 2) == 2
    assert threads_for(0.4, 2, 2) == 2          # a light background keeps both
    assert threads_for(0.8, 2, 2) == 1
    assert threads_for(1.9, 2, 2) == 1          # never below one
    assert threads_for(0.0, 8, 4) == 4          # never above the configured count
    assert threads_for(3.0, 8, 8) == 5


class FakeMachine:
    """Two CPUs; each `advance(seconds, own, others)` adds that much busy time of this process and of
    other processes (in cores) and moves the clock."""

    hz = 100

    def __init__(self):
        self.now = 0.0
        self.busy = self.total = 0
        self.own = 0.0

    def advance(self, seconds: float, own: float, others: float) -> None:
        self.now += seconds
        self.total += int(2 * seconds * self.hz)
        self.busy += int((own + others) * seconds * self.hz)
        self.own += own * seconds

    def governor(self, applied: list[int], idle_gap_s: float = 0.5) -> ThreadGovernor:
        governor = ThreadGovernor(2, applied.append, {0, 1}, read_jiffies=lambda cpus: (self.busy, self.total),
                                  own_cpu_seconds=lambda: self.own, clock=lambda: self.now, idle_gap_s=idle_gap_s)
        governor.load.hz = self.hz
        return governor


def test_a_busy_core_takes_a_thread_after_two_windows_and_gives_it_back():
    machine, applied = FakeMachine(), []
    governor = machine.governor(applied)
    machine.advance(0.5, own=2.0, others=0.0)
    assert governor.poll() is None                      # within the first window: not measured
    machine.advance(0.6, own=2.0, others=0.0)
    assert governor.poll() is None and governor.threads == 2
    machine.advance(1.0, own=1.2, others=0.8)           # a hog arrives
    assert governor.poll() is None and applied == []    # one window is not enough
    machine.advance(1.0, own=1.0, others=1.0)
    assert governor.poll() == 1 and applied == [1] and governor.threads == 1
    machine.advance(1.0, own=1.0, others=1.0)
    assert governor.poll() is None
    machine.advance(1.0, own=1.0, others=0.0)           # the hog is gone
    assert governor.poll() is None
    machine.advance(1.0, own=1.0, others=0.1)
    assert governor.poll() == 2 and applied == [1, 2] and governor.num_changes == 2


def test_a_burst_of_one_window_moves_nothing():
    machine, applied = FakeMachine(), []
    governor = machine.governor(applied)
    for others in (0.0, 1.0, 0.0, 1.0, 0.0):            # alternating windows never agree twice
        machine.advance(1.0, own=1.0, others=others)
        governor.poll()
    assert applied == [] and governor.threads == 2


def test_only_the_time_the_engine_works_is_measured():
    """A window that began before an idle spell of idle_gap_s or more (the engine loop's `idle()`) is
    begun again at the next step, and the change it was waiting to confirm is dropped: another
    program busy while this engine had nothing to do (a second server being benchmarked) takes no
    thread from the steps that follow. Shorter gaps between requests, and long steps, reset nothing."""
    machine, applied = FakeMachine(), []
    governor = machine.governor(applied, idle_gap_s=0.5)

    def working(seconds: float, others: float) -> None:
        """steps 0.125 s apart for `seconds`, each polling"""
        for _ in range(round(seconds / 0.125)):
            machine.advance(0.125, own=2.0 - others, others=others)
            governor.poll()

    def idle(seconds: float, others: float) -> None:
        governor.idle()
        machine.advance(seconds, own=0.0, others=others)

    working(1.5, others=0.0)
    idle(3.0, others=2.0)                               # idle while another program runs
    working(2.5, others=0.0)                            # the spell is not in any window
    assert applied == []
    working(1.0, others=1.0)                            # a hog beside the working engine: one window...
    idle(2.0, others=1.0)                               # ...then idle
    working(1.125, others=1.0)                          # the first window after it does not confirm it
    assert applied == []
    working(1.0, others=1.0)                            # two windows of work that agree
    assert applied == [1]

    machine, applied = FakeMachine(), []
    governor = machine.governor(applied, idle_gap_s=0.5)
    working(1.0, others=1.0)                            # one window with a hog...
    idle(0.25, others=1.0)                              # ...a short gap between requests...
    assert governor.poll() is None                      # ...then a long step starts...
    machine.advance(0.75, own=1.0, others=1.0)
    assert governor.poll() == 1 and applied == [1]      # ...and the next one's window confirms it


def test_an_unreadable_stat_disables_it():
    applied = []
    governor = ThreadGovernor(2, applied.append, None, read_jiffies=lambda cpus: None)
    assert governor.poll() is None and applied == []


def test_the_engine_polls_it_on_a_cpu_when_asked(monkeypatch):
    """`adaptive_threads` gives the engine core a governor (on a CPU, without overlapped steps) that
    every step polls; off by default."""
    import asyncio

    from server.engine.request import GenerationRequest, SamplingParams
    from tests.helpers import collect, tiny_engine
    engine = tiny_engine(start=False)
    assert engine.core.threads is None
    engine.stop()
    overlapped = tiny_engine(adaptive_threads=True, overlap_steps=True, start=False)
    assert overlapped.core.threads is None
    overlapped.stop()
    engine = tiny_engine(adaptive_threads=True, start=False)
    try:
        assert isinstance(engine.core.threads, ThreadGovernor)
        polls, idles, idled = [], [], threading.Semaphore(0)
        monkeypatch.setattr(engine.core.threads, "poll", lambda: polls.append(1))
        monkeypatch.setattr(engine.core.threads, "idle", lambda: idles.append(len(polls)) or idled.release())
        engine.start()
        assert idled.acquire(timeout=30) and idles[0] == 0          # waiting for work, before any step
        request = GenerationRequest("r", [5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True))
        _, _, tokens = asyncio.run(collect(engine, request))
        assert len(tokens) == 5 and len(polls) >= 5
        while idles[-1] < len(polls):                               # and told so again after its steps
            assert idled.acquire(timeout=30)
    finally:
        engine.stop()
