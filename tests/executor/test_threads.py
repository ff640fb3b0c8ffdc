"""Threads from the CPUs a process may use (server/executor/threads.py): the cgroup quota in v1 and v2 and
the affinity mask."""
from __future__ import annotations

import os

import torch

from server.executor.threads import available_cpus, cgroup_cpu_limit, configure_threads


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert cgroup_cpu_limit(tmp_path) == 4.0
    assert available_cpus(tmp_path) == min(4, len(os.sched_getaffinity(0)))


def test_no_cgroup_files_means_the_affinity_mask(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "missing") is None
    assert available_cpus(tmp_path / "missing") == len(os.sched_getaffinity(0))


def test_configure_threads_takes_a_request_and_restores():
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1
    finally:
        torch.set_num_threads(before)
