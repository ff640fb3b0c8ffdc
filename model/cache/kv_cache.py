"""The paged cache tensors: one `[num_blocks * block_size, row_width]` tensor per layer.

A row is what one token keeps for one layer (docs/architecture.md); the row width comes from
the model config, so MLA families store only their latent rows and GQA families `[K | V]`.
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
        num_slots = num_blocks * block_size
        self.layers = [torch.zeros(num_slots, config.cache_row_width, dtype=dtype, device=device)
                       for _ in range(config.num_layers)]  # each [slots, row_width]

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
