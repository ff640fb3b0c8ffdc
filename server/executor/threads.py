"""How many threads the model runs on: from the CPUs this process may actually use, not the
machine's count.

The CPUs in the process's affinity mask (`os.sched_getaffinity`: taskset, cpusets, Kubernetes'
static CPU manager), capped by the cgroup's CPU quota (`cpu.max` in cgroup v2,
`cpu.cfs_quota_us / cpu.cfs_period_us` in v1: a container limited to 1.5 CPUs gets 1 thread).
PyTorch's own default counts the cores it can see, which in a container with a quota is more threads
than it will be scheduled on. `OMP_NUM_THREADS` or a `threads` argument still win.

A core that another process keeps busy is not visible here: the engine's thread governor
(server/executor/thread_governor.py, `serve --adaptive-threads`) follows that at run time. Measured
on 2 cores with a busy loop on one of them (docs/benchmarks.md, issue 18): two threads decode at a
third of their quiet speed or less, one thread at 0.7 of it; a shorter OpenMP spin (`GOMP_SPINCOUNT`)
made it worse, so the wait policy is left as libgomp has it.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger("customllm.threads")

def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (quota / period), None when unlimited or unreadable."""
    try:
        text = (root / "cpu.max").read_text().split()                         # v2: "quota period" | "max period"
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())          # v1: -1 when unlimited
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process can run on: its affinity mask, capped by the cgroup quota (at least 1)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        count = min(count, max(1, math.floor(limit)))
    return max(1, count)


def configure_threads(requested: int | None = None) -> int:
    """Set torch's thread count: `requested`, else OMP_NUM_THREADS's (torch reads it itself), else
    the CPUs available. Returns the count in use."""
    import torch

    if requested:
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" not in os.environ:
        available = available_cpus()
        if available != torch.get_num_threads():
            log.info("%d torch threads (the CPUs this process may use; torch counted %d)", available,
                     torch.get_num_threads())
        torch.set_num_threads(available)
    return torch.get_num_threads()
