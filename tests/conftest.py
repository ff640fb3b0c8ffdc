"""Test-wide settings: Triton kernels run in its interpreter when there is no CUDA device (the flag
must be set before a kernel is defined), tests marked `gpu` are skipped without one, and the kernel
timings a `--dtype auto` load measures (model/layers/kernel_choice.py) are cached in a directory of
the test session's own, never in the user's ~/.cache (subprocesses inherit it)."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CUSTOMLLM_CACHE_DIR", tempfile.mkdtemp(prefix="customllm-test-cache-"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
