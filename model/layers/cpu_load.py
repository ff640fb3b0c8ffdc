"""How many of this process's CPUs other processes kept busy over an interval, from `/proc/stat`.

The CPUs' busy time (user, nice, system and steal jiffies, summed over the affinity mask) less this
process's own CPU time (`os.times`, every thread of it and the children it waited for), over the interval's wall time: e.g. 0.9
when another program kept one of two cores busy nine tenths of the time. Interrupt and softirq time
is not counted busy: on a loopback it is mostly this process's own network traffic.

Two readers: the thread governor (server/executor/thread_governor.py), which gives other processes'
cores back while the engine runs, and the kernel timings (model/layers/kernel_choice.py), which are
not cached when other processes competed with them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def read_cpu_jiffies(cpus: set[int] | None, stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over `cpus` (None: the whole machine), or None if unreadable.
    Busy is user, nice, system and steal time: not idle, iowait, irq or softirq."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu"):
            break                               # the cpu lines come first
        if name == "cpu" and cpus is not None:
            continue                            # the machine's sum: only without a mask
        if name != "cpu" and (cpus is None or int(name[3:]) not in cpus):
            continue
        fields = [int(v) for v in rest.split()[:8]]       # user nice system idle iowait irq softirq steal
        total += sum(fields)
        busy += fields[0] + fields[1] + fields[2] + fields[7]
    return (busy, total) if total else None


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process, every thread of it, and of the children it has
    waited for (the C compiler building a kernel: this process's work, not another's)."""
    return sum(os.times()[:4])


@dataclass(frozen=True)
class LoadSample:
    at: float                      # monotonic seconds
    busy: int                      # jiffies of the CPUs
    total: int
    own: float                     # this process's CPU seconds


class CpuLoad:
    """Samples of the CPUs of an affinity mask (None: every CPU) and of this process; `others` of
    two samples is the cores other processes kept busy between them."""

    def __init__(self, cpus: set[int] | None = None, read_jiffies=read_cpu_jiffies, own=own_cpu_seconds,
                 clock=time.monotonic):
        self.cpus = cpus
        self.num_cpus = len(cpus) if cpus else (os.cpu_count() or 1)
        self.read_jiffies, self.own, self.clock = read_jiffies, own, clock
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @classmethod
    def of_this_process(cls) -> "CpuLoad":
        """Over this process's affinity mask."""
        return cls(set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)

    def sample(self) -> LoadSample | None:
        """None where `/proc/stat` cannot be read."""
        jiffies = self.read_jiffies(self.cpus)
        return None if jiffies is None else LoadSample(self.clock(), jiffies[0], jiffies[1], self.own())

    def others(self, start: LoadSample, end: LoadSample) -> float | None:
        """Cores other processes kept busy from `start` to `end` (None: no time passed)."""
        if end.total <= start.total:
            return None
        wall = (end.total - start.total) / self.hz / self.num_cpus
        return max(0.0, (end.busy - start.busy) / self.hz - (end.own - start.own)) / wall
