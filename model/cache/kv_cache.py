"""The paged cache tensors: one `[num_blocks * block_size, row_width]` tensor per layer.

A row is what one token keeps for one layer (a block of B tokens is B consecutive rows, slot
`block * B + offset`); the row width comes from the model config, so MLA families store only their
latent rows and GQA families `[K | V]`.

The cache may set its last block aside as scratch (`reserve_scratch_block`): CUDA-graph decode steps
pad their batch with rows that write and read only that block, so it must never hold a request's
rows. `num_allocatable_blocks` is what a block pool over this cache may hand out.
"""
from __future__ import annotations

import torch

from model.config import BaseModelConfig
from model.dtypes import dtype_bytes

GIB = 1024 ** 3


class KVCache:
    def __init__(self, config: BaseModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise --kv-cache-memory")
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.scratch_block: int | None = None
        num_slots = num_blocks * block_size
        self.layers = [torch.zeros(num_slots, config.cache_row_width, dtype=dtype, device=device)
                       for _ in range(config.num_layers)]  # each [slots, row_width]

    def reserve_scratch_block(self) -> int:
        """Set the last block aside as scratch (idempotent) and return its id; a block pool built
        afterwards leaves it out (`num_allocatable_blocks`)."""
        if self.scratch_block is None:
            if self.num_blocks < 2:
                raise ValueError("a scratch block needs a cache of at least two blocks")
            self.scratch_block = self.num_blocks - 1
        return self.scratch_block

    @property
    def num_allocatable_blocks(self) -> int:
        """Blocks requests may hold: all but the scratch block, when one is reserved."""
        return self.num_blocks - (self.scratch_block is not None)

    @property
    def bytes_per_token(self) -> int:
        return self.config.cache_bytes_per_token(dtype_bytes(self.dtype))

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.num_blocks * self.block_size

    @staticmethod
    def blocks_for_budget(config: BaseModelConfig, budget_bytes: int, block_size: int,
                          dtype: torch.dtype) -> int:
        """How many blocks fit in `budget_bytes` of cache memory."""
        block_bytes = config.cache_bytes_per_token(dtype_bytes(dtype)) * block_size
        return int(budget_bytes // block_bytes)

    @classmethod
    def from_budget(cls, config: BaseModelConfig, budget_bytes: int, block_size: int,
                    dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        num_blocks = cls.blocks_for_budget(config, budget_bytes, block_size, dtype)
        if num_blocks < 1:
            raise ValueError(
                f"--kv-cache-memory of {budget_bytes / GIB:.3f} GiB holds no block of {block_size} tokens "
                f"({config.cache_bytes_per_token(dtype_bytes(dtype)) * block_size} bytes)")
        return cls(config, num_blocks, block_size, dtype, device)
