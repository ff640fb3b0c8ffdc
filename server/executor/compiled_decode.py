"""Decode steps through torch.compile (inductor) on the CPU, one compiled graph per batch bucket.

The padding is DecodeGraphs' (server/executor/decode_graphs.py): a decode step of n sequences is
copied into static buffers of the smallest bucket B >= n, rows n .. B-1 compute one token over the
cache's scratch block, so every bucket has one set of shapes and compiles once. A model qualifies
when its decode step has no host syncs (`graph_capturable`: attention in a kernel, here the CPU one
of model/layers/cpu_decode_attention.py, an op of the graph; no MoE that routes through the host).

- Compiled at start-up (`compile_all`), smallest bucket first, one log line per bucket with its time.
  Inductor's caches (its FX-graph and generated-code caches) live under
  `$CUSTOMLLM_CACHE_DIR/inductor` unless TORCHINDUCTOR_CACHE_DIR is set, so a restart mostly reads
  them back.
- A bucket that fails to compile (no C++ compiler, an inductor error) is logged once and runs
  eagerly; so does any step whose guards would need a recompile while serving
  (`eager_on_recompile`), and every step that is not a pure decode step or is past the largest bucket.
- Off by default (`--compile-decode`): docs/benchmarks.md has what it gained on the 2-core machine
  against what it costs at start-up.
"""
from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

from model.cache.batch import PagedBatch
from model.cache.kv_cache import KVCache
from server.executor.decode_graphs import DecodeGraphs, buckets_up_to, graph_capturable

log = logging.getLogger("customllm.compiled_decode")

CPU_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def set_inductor_cache_dir() -> None:
    """Inductor's on-disk caches beside the server's other caches, unless the user placed them."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from model.layers.kernel_choice import cache_dir
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


class CompiledDecode(DecodeGraphs):
    """`run(batch)` → logits [n, V] of a decode-only batch through its bucket's compiled step, or None
    (the runner then runs the model eagerly)."""

    def __init__(self, model: nn.Module, cache: KVCache, buckets: tuple[int, ...] = CPU_BUCKETS,
                 backend: str = "inductor"):
        super().__init__(model, cache, buckets=buckets, use_cuda_graphs=False)
        self.backend = backend
        self.window = getattr(model.config, "sliding_window", None)
        self.steps: dict[int, object] = {}        # bucket → its compiled forward_paged
        config = torch._dynamo.config
        for limit in ("recompile_limit", "cache_size_limit"):     # one graph per bucket, all kept
            if hasattr(config, limit):
                setattr(config, limit, max(getattr(config, limit), 2 * len(self.buckets)))

    @torch.inference_mode()
    def compile_all(self) -> int:
        """Compile every bucket's step (two calls each: the second must not recompile); returns how
        many compiled."""
        started = time.monotonic()
        for i, bucket in enumerate(self.buckets, 1):
            began = time.monotonic()
            log.info("compiling the decode step for batch %d (%d of %d)", bucket, i, len(self.buckets))
            step = torch.compile(self.model.forward_paged, backend=self.backend, dynamic=False)
            batch = self.static_batch(bucket, self.window)
            self._pad(slice(0, bucket))
            try:
                for _ in range(2):
                    step(batch, self.cache.layers)
            except Exception as exc:  # noqa: BLE001 - any compiler failure leaves this bucket eager
                log.warning("batch %d: compiling the decode step failed (%s: %s); it runs eagerly", bucket,
                            type(exc).__name__, str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "")
                continue
            self.steps[bucket] = step
            log.info("batch %d compiled in %.1f s", bucket, time.monotonic() - began)
        log.info("decode steps compiled for %d of %d batch sizes in %.1f s", len(self.steps), len(self.buckets),
                 time.monotonic() - started)
        return len(self.steps)

    @torch.inference_mode()
    def run(self, batch: PagedBatch) -> torch.Tensor | None:
        if batch.max_position >= self.model.config.max_context:
            return None                                   # the eager step raises the context error
        bucket = self.bucket_for(batch.block_tables.shape[0])
        if bucket not in self.steps:
            return None
        return super().run(batch)

    def run_padded(self, batch: PagedBatch, bucket: int) -> torch.Tensor:
        """The bucket's compiled step over the static buffers (their max_position is fixed, so no
        guard sees the step's own) → logits [bucket, V]."""
        with torch.compiler.set_stance("eager_on_recompile"):
            return self.steps[bucket](self.static_batch(bucket, batch.window), self.cache.layers)


def make_compiled_decode(model: nn.Module, cache: KVCache, max_num_seqs: int,
                         backend: str = "inductor") -> CompiledDecode | None:
    """CompiledDecode for the buckets `max_num_seqs` allows, compiled now; None when the model's
    decode step cannot be (attention without a kernel, MoE routing through the host) or the cache
    has no block to spare for padding."""
    if cache.num_blocks < 2 or not graph_capturable(model):
        log.info("decode steps run eagerly: compiling them needs attention in a kernel and no MoE that syncs")
        return None
    set_inductor_cache_dir()
    compiled = CompiledDecode(model, cache, buckets_up_to(max_num_seqs, CPU_BUCKETS), backend=backend)
    compiled.compile_all()
    return compiled
