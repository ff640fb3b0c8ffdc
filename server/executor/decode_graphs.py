"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode-only step of n sequences runs in the smallest bucket B >= n. Everything the step reads
lives in static buffers sized for the largest bucket: token ids, positions, slot mapping, block
tables `[B, max_blocks_per_seq]` and context lengths; a bucket's graph reads the first B rows. Rows
n .. B-1 are padding: they compute one token over the cache's scratch block, which the block pool
never hands out (`KVCache.reserve_scratch_block`), and their logits are dropped. Prefill, mixed
steps and batches past the largest bucket run eagerly.

Capturable models are those whose decode step has static shapes and no host syncs: attention
through a Triton decode kernel (`model.kernels.use_triton_decode_attention`: MLA, or grouped-query
for the Llama and SmartLLM families) and, for a MoE with routed experts, sync-free routing
(`model.layers.moe.use_sync_free_moe`, with the grouped-GEMM kernel of `model.kernels.grouped_moe`).
On the CPU (tests) the same buffers, padding and forward run eagerly, with the kernel in Triton's
interpreter; only `capture()` / `replay()` need CUDA.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from model.cache.batch import PagedBatch
from model.cache.kv_cache import KVCache
from model.kernels import decodes_through_kernels
from model.layers.moe import routes_sync_free, use_sync_free_moe

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def buckets_up_to(max_num_seqs: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The buckets a server with at most `max_num_seqs` running sequences can use: those below it and
    the first that holds it (none past the largest)."""
    below = tuple(b for b in buckets if b < max_num_seqs)
    covering = next((b for b in buckets if b >= max_num_seqs), None)
    return below + ((covering,) if covering is not None else ())


def graph_capturable(model: nn.Module) -> bool:
    """Every attention layer decodes through a kernel and every MoE with routed experts routes
    without host syncs."""
    return decodes_through_kernels(model) and routes_sync_free(model)


class DecodeGraphs:
    def __init__(self, model: nn.Module, cache: KVCache,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, use_cuda_graphs: bool = True):
        assert graph_capturable(model), "the model's decode step has host syncs or dynamic shapes"
        scratch_block = cache.reserve_scratch_block()
        self.model = model
        self.cache = cache
        self.buckets = tuple(sorted(buckets))
        self.block_size = cache.block_size
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * cache.block_size
        self.max_blocks_per_seq = -(-model.config.max_context // cache.block_size)
        self.use_cuda_graphs = use_cuda_graphs
        device = cache.layers[0].device
        largest = self.buckets[-1]
        long = dict(dtype=torch.long, device=device)
        # the static inputs, largest bucket, all padding to begin with
        self.token_ids = torch.empty(largest, **long)                                  # [B]
        self.positions = torch.empty(largest, **long)                                  # [B]
        self.slot_mapping = torch.empty(largest, **long)                               # [B]
        self.block_tables = torch.empty(largest, self.max_blocks_per_seq, **long)      # [B, MB]
        self.context_lens = torch.empty(largest, **long)                               # [B]
        self.logits_index = torch.arange(largest, **long)                              # [B]
        self._pad(slice(0, largest))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}                                     # bucket → [B, V]

    def bucket_for(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def static_batch(self, bucket: int, window: int | None) -> PagedBatch:
        """A decode PagedBatch over the first `bucket` rows of the static buffers (no gather-path
        fields: the kernels read the block tables)."""
        return PagedBatch(
            token_ids=self.token_ids[:bucket], positions=self.positions[:bucket],
            slot_mapping=self.slot_mapping[:bucket], query_index=None, query_valid=None, context_slots=None,
            attn_mask=None, logits_index=self.logits_index[:bucket], is_decode_only=True,
            block_tables=self.block_tables[:bucket],
            context_lens=self.context_lens[:bucket], block_size=self.block_size, window=window,
            max_position=self.model.config.max_context - 1)

    def _load(self, batch: PagedBatch, bucket: int) -> None:
        """Copy a real decode batch into the static buffers; rows past it become padding again."""
        n, width = batch.block_tables.shape
        self.token_ids[:n].copy_(batch.token_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.block_tables[:n, :width].copy_(batch.block_tables)
        self.block_tables[:n, width:].fill_(-1)
        self.context_lens[:n].copy_(batch.context_lens)
        if n < bucket:
            self._pad(slice(n, bucket))

    def _pad(self, rows: slice) -> None:
        """Make `rows` padding: token 0 at position 0, written to and reading only the scratch block."""
        self.token_ids[rows] = 0
        self.positions[rows] = 0
        self.slot_mapping[rows] = self.scratch_slot
        self.block_tables[rows] = -1
        self.block_tables[rows, 0] = self.scratch_block
        self.context_lens[rows] = 1

    @torch.inference_mode()
    def capture(self, window: int | None = None) -> None:
        """Record one CUDA graph per bucket (largest first, so smaller ones reuse its memory pool)."""
        assert self.use_cuda_graphs and torch.cuda.is_available()
        pool = None
        for bucket in reversed(self.buckets):
            batch = self.static_batch(bucket, window)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):                       # warm-up: kernels compiled, allocator settled
                    self.model.forward_paged(batch, self.cache.layers)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self.model.forward_paged(batch, self.cache.layers)
            pool = graph.pool()
            self.graphs[bucket] = graph
        log.info("captured decode CUDA graphs for batch sizes %s", ", ".join(map(str, self.buckets)))

    @torch.inference_mode()
    def run(self, batch: PagedBatch) -> torch.Tensor | None:
        """Logits [n, V] of a decode-only batch, or None when it is not one this can run."""
        if not batch.is_decode_only or batch.block_tables.shape[1] > self.max_blocks_per_seq:
            return None
        n = batch.block_tables.shape[0]
        bucket = self.bucket_for(n)
        if bucket is None:
            return None
        self._load(batch, bucket)
        if self.use_cuda_graphs:
            if bucket not in self.graphs:
                return None
            self.graphs[bucket].replay()
            return self.outputs[bucket][:n]
        return self.run_padded(batch, bucket)[:n]

    def run_padded(self, batch: PagedBatch, bucket: int) -> torch.Tensor:
        """The eager step over the loaded static buffers → logits [bucket, V] (a subclass may run a
        compiled one: server/executor/compiled_decode.py)."""
        static = replace(self.static_batch(bucket, batch.window), max_position=batch.max_position)
        return self.model.forward_paged(static, self.cache.layers)


def make_decode_graphs(model: nn.Module, cache: KVCache, max_num_seqs: int, capture: bool) -> "DecodeGraphs | None":
    """Prepare `model` (sync-free MoE routing with the grouped-GEMM kernel) and, when its decode step
    can then be captured, DecodeGraphs over the cache's scratch block, for the buckets `max_num_seqs`
    allows; captured when `capture` (CUDA), else run eagerly (tests on the CPU). None when the model
    cannot be."""
    from model.kernels.grouped_moe import grouped_moe

    if cache.num_blocks < 2:
        return None
    use_sync_free_moe(model, grouped_gemm=grouped_moe)
    if not graph_capturable(model):
        log.info("decode steps run eagerly: the model has attention without a kernel or a MoE that syncs")
        return None
    graphs = DecodeGraphs(model, cache, buckets=buckets_up_to(max_num_seqs), use_cuda_graphs=capture)
    if capture:
        graphs.capture(window=getattr(model.config, "sliding_window", None))
    return graphs
