"""Threads that follow the CPUs other processes leave free, while the engine runs.

`threads.configure_threads` counts the CPUs this process may use (affinity mask, cgroup quota), but
not what other processes do with them. A core that another process keeps busy costs far more than
its share: the model's OpenMP team waits at every parallel region for the thread that lost its core
(on this project's 2-core machine, with a busy loop beside it, two threads decoded at 0.2–0.5 of
their quiet speed, one thread at 0.7: docs/benchmarks.md, "Under contention").

So every WINDOW_S the governor reads how busy the CPUs of the affinity mask were (`/proc/stat`)
minus this process's own CPU time (`os.times`, every thread of it), i.e. the cores other processes
took, and sets torch's thread count to the cores left (rounded, at least one, at most the configured
count). A change needs two windows in a row that agree, so a short burst does not move it; each
change is logged in one line. Where `/proc/stat` cannot be read it does nothing.

Only the time the engine is at work counts: a window is measured from one step to a later one, and
one that began before an idle spell (the engine without work for IDLE_GAP_S or more: `idle()`, from
the engine loop) is dropped and begun again at the next step, with any change it was waiting to
confirm. Long steps are not idle time, and short gaps between requests reset nothing. Measured
across the spell, another program's work while this engine had none (a second server being
benchmarked, a batch job between requests) would take a thread away from the steps that follow. Interrupt and softirq time is not counted as other
processes' either: on a loopback it is mostly this server's own network traffic, which fewer
threads would not avoid (on the 2-core machine, a second server's benchmark and the load
generator's traffic once read as "0.8 of the 2 CPUs busy" and halved the threads of a c=16 run).

`set_num_threads` applies to the thread that calls it: the engine calls `poll()` from the thread
that runs the model, once per step (a clock read unless a window has passed).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from model.layers.cpu_load import CpuLoad, own_cpu_seconds, read_cpu_jiffies

log = logging.getLogger("customllm.threads")

WINDOW_S = 1.0
IDLE_GAP_S = 1.0        # the engine idle this long: the window begins again


def threads_for(others_cores: float, num_cpus: int, max_threads: int) -> int:
    """The thread count that fits in the cores other processes leave: num_cpus - others, rounded."""
    return max(1, min(max_threads, int(num_cpus - others_cores + 0.5)))


class ThreadGovernor:
    def __init__(self, max_threads: int, set_threads: Callable[[int], None], cpus: set[int] | None = None,
                 read_jiffies=read_cpu_jiffies, own_cpu_seconds=own_cpu_seconds,
                 clock=time.monotonic, window_s: float = WINDOW_S, idle_gap_s: float = IDLE_GAP_S):
        """`cpus`: the CPUs of the affinity mask (None: all); `set_threads`: applies a thread count."""
        self.max_threads = max_threads
        self.threads = max_threads
        self.set_threads = set_threads
        self.load = CpuLoad(cpus, read_jiffies, own_cpu_seconds, clock)
        self.num_cpus = self.load.num_cpus
        self.clock, self.window_s, self.idle_gap_s = clock, window_s, idle_gap_s
        self.num_changes = 0
        self._pending: int | None = None
        self._start = self.load.sample()
        self._idle_since: float | None = None

    def idle(self) -> None:
        """The engine has no work (called by its loop each time it waits for some)."""
        if self._idle_since is None:
            self._idle_since = self.clock()

    def poll(self) -> int | None:
        """Measure when a window has passed; returns the new thread count when it changed. Called
        once per engine step."""
        now = self.clock()
        idle_since, self._idle_since = self._idle_since, None
        if self._start is None:
            return None
        if idle_since is not None and now - idle_since >= self.idle_gap_s:
            self._start, self._pending = self.load.sample(), None        # idle a while: begin again
            return None
        if now - self._start.at < self.window_s:
            return None
        end = self.load.sample()
        if end is None:
            self._start = None
            return None
        start, self._start = self._start, end
        others = self.load.others(start, end)       # cores busy over the window, less this process's own
        if others is None:
            return None
        wanted = threads_for(others, self.num_cpus, self.max_threads)
        if wanted == self.threads:
            self._pending = None
            return None
        if self._pending != wanted:             # the next window must agree
            self._pending = wanted
            return None
        self._pending = None
        log.info("torch threads %d -> %d: other processes keep %.1f of the %d CPUs busy", self.threads, wanted,
                 others, self.num_cpus)
        self.threads = wanted
        self.num_changes += 1
        self.set_threads(wanted)
        return wanted


def governor_for_this_process(max_threads: int) -> ThreadGovernor | None:
    """A governor over this process's affinity mask that sets torch's threads, or None where the
    CPU load cannot be read."""
    import torch

    cpus = CpuLoad.of_this_process().cpus
    if read_cpu_jiffies(cpus) is None:
        return None
    return ThreadGovernor(max_threads, torch.set_num_threads, cpus)
