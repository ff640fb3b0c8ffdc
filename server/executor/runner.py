"""Model runner: turns a scheduled step into tensors, runs the model over the paged cache.

It never decides policy: the scheduler says which tokens of which sequences run (as
`SequenceChunk`s, so the executor knows nothing of the engine's request state); the runner builds
the `PagedBatch` (positions, slot mapping, block tables, masks) and returns the logits of the rows
that sample: the last position of each chunk that samples, or with speculative decoding its last
1 + k positions (the known token and k drafts, `num_logits`).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from model.kernels import decodes_through_kernels
from model.cache.kv_cache import KVCache
from model.cache.batch import PagedBatch, SequenceChunk


class ModelRunner:
    """`small_step_model` (optional) is a copy of the model in another dtype used for steps of at most
    `small_step_tokens` tokens: on CPUs without native float16 GEMMs for large batches, float16 is
    the fastest for one or two tokens and bfloat16 for everything bigger (`--dtype mixed`). Both
    read and write the same cache."""

    def __init__(self, model: nn.Module, cache: KVCache, device: torch.device,
                 small_step_model: nn.Module | None = None, small_step_tokens: int = 2,
                 decode_graphs=None):
        self.model = model
        self.decode_graphs = decode_graphs          # server.executor.decode_graphs.DecodeGraphs, for decode steps
        self.cache = cache
        self.device = device
        self.small_step_model = small_step_model
        self.small_step_tokens = small_step_tokens
        self.window = getattr(model.config, "sliding_window", None)
        # decode kernels read the block tables: decode batches then skip the gather-path tensors
        self.decode_kernels = decodes_through_kernels(model)
        # seconds the last `execute` spent in the forward (batch building excluded); on CUDA the
        # device is synchronised for it only when `time_forward` is set (benchmarks)
        self.time_forward = False
        self.last_forward_s = 0.0
        self.simulated_step_s: float | None = None      # `simulate_device`

    def simulate_device(self, step_seconds: float) -> None:
        """Make every forward a wait of `step_seconds` that leaves the host free (it holds no lock and
        not the GIL, as a GPU step leaves the host free) and returns all-zero logits: benchmarks and
        tests of the serving path's own work (`bench engine --simulated-device-ms`) run around it."""
        self.simulated_step_s = step_seconds

    def build_batch(self, chunks: list[SequenceChunk], num_logits: list[int] | None = None) -> PagedBatch:
        """`num_logits[i]`: how many of chunk i's last positions return logits (default: its last
        one when it `needs_logits`, else none)."""
        decode_only = all(len(c.token_ids) == 1 for c in chunks)
        batch = PagedBatch.build(chunks, self.cache.block_size, self.device, window=self.window,
                                 with_gather=not (decode_only and self.decode_kernels))
        if num_logits is not None and any(n > 1 for n in num_logits):
            ends = np.cumsum([len(c.token_ids) for c in chunks])                               # [B]
            index = np.concatenate([np.arange(end - n, end) for end, n in zip(ends.tolist(), num_logits)])
            batch.logits_index = torch.from_numpy(index.astype(np.int64)).to(self.device)    # [N]
        return batch

    def build_decode_batch(self, token_ids: np.ndarray, positions: np.ndarray, tables: np.ndarray,
                           needs: np.ndarray, on_host: bool = False) -> PagedBatch:
        """The batch of a step of one token per sequence whose inputs a persistent batch keeps
        (`PagedBatch.decode`); `on_host`: its tensors left on the host, for the thread that runs the
        step to move (`PagedBatch.to`): a copy to a GPU from another thread would wait for the step
        the GPU is running."""
        return PagedBatch.decode(token_ids, positions, tables, needs, self.cache.block_size,
                                 "cpu" if on_host else self.device,
                                 window=self.window, with_gather=not self.decode_kernels)

    @torch.inference_mode()
    def execute(self, chunks: list[SequenceChunk], num_logits: list[int] | None = None) -> torch.Tensor:
        """Logits [N, V] in float32, one row per chunk that completes its sequence's known tokens,
        in chunk order (with `num_logits`, that many rows per chunk: see `build_batch`)."""
        return self.execute_batch(self.build_batch(chunks, num_logits))

    @torch.inference_mode()
    def execute_batch(self, batch: PagedBatch) -> torch.Tensor:
        """`execute` of a batch already built."""
        started = time.perf_counter()
        logits = self._forward(batch)
        if self.time_forward and logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        self.last_forward_s = time.perf_counter() - started
        return logits

    def _forward(self, batch: PagedBatch) -> torch.Tensor:
        if self.simulated_step_s is not None:
            time.sleep(self.simulated_step_s)
            return torch.zeros(batch.logits_index.shape[0], self.model.config.vocab_size, device=self.device)
        if self.decode_graphs is not None:
            logits = self.decode_graphs.run(batch)
            if logits is not None:
                return logits.float()
        model = self.model
        if self.small_step_model is not None and batch.token_ids.shape[0] <= self.small_step_tokens:
            model = self.small_step_model
        return model.forward_paged(batch, self.cache.layers).float()
