"""How many threads the model runs on, and how idle OpenMP threads wait: from the CPUs this process
may actually use, not the machine's count.

- Threads: the CPUs in the process's affinity mask (`os.sched_getaffinity`: taskset, cpusets,
  Kubernetes' static CPU manager), capped by the cgroup's CPU quota (`cpu.max` in cgroup v2,
  `cpu.cfs_quota_us / cpu.cfs_period_us` in v1: a container limited to 1.5 CPUs gets 1 thread).
  PyTorch's own default counts the cores it can see, which in a container with a quota is more
  threads than it will be scheduled on. `OMP_NUM_THREADS` or `--threads` still win.
- Waiting: an OpenMP thread that finished its share spins for a while before it sleeps. When another
  process holds one of the cores, the spinning thread burns the time slice its partner needs, and a
  decode step of ~60 parallel regions per layer slows down many times over. A short spin
  (`GOMP_SPINCOUNT`, libgomp's, which PyTorch's CPU wheels use) keeps most of the quiet-machine
  speed and degrades in proportion under contention (docs/benchmarks.md has the measurements).
  It must be in the environment before libgomp loads, so `customllm` sets it at start-up
  (`set_wait_policy_env`), unless `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` is already set.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger("customllm.threads")

SPIN_COUNT = "10000"     # libgomp's default is 300,000 spins (~0.1-1 ms) before a thread sleeps


def set_wait_policy_env(environ=os.environ) -> None:
    """Shorten OpenMP's busy-wait unless the user chose a wait policy. Call before torch loads."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT


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
