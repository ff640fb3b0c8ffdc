"""The machine's measured memory bandwidth and the bytes one decode step must move."""
from __future__ import annotations

import time

import torch
from torch import nn

from model.config import BaseModelConfig


def measure_copy_bandwidth(device: torch.device, size_mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write counted), best of `repeats`."""
    numel = size_mib * 1024 * 1024 // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def weight_bytes_touched(model: nn.Module, batch_size: int) -> int:
    """Bytes of parameters one decode step reads: every matrix, except that embedding tables give
    only the looked-up rows and MoE routed experts count by the expected number touched at this
    batch size (each token picks top_k of E experts uniformly at random)."""
    config = model.config
    total = 0
    num_experts = getattr(config, "num_routed_experts", 0)
    top_k = getattr(config, "top_k_experts", 0)
    touched_fraction = 1.0
    if num_experts:
        miss = (1 - top_k / num_experts) ** batch_size       # chance an expert is picked by no token
        touched_fraction = 1 - miss
    for name, param in model.named_parameters():
        nbytes = param.numel() * param.element_size()
        if isinstance(param, nn.Parameter) and ("embed" in name or "embedding" in name or "tok_emb" in name) \
                and param.dim() == 2 and not _is_tied_head(model, param):
            nbytes = min(batch_size, param.shape[0]) * param.shape[1] * param.element_size()
        elif ".routed_experts." in name:
            nbytes = int(nbytes * touched_fraction)
        total += nbytes
    return total


def _is_tied_head(model: nn.Module, param: torch.Tensor) -> bool:
    head = getattr(model, "lm_head", None)
    return head is not None and head.weight is param


def cache_bytes_read(config: BaseModelConfig, batch_size: int, context_len: int, dtype_bytes: int) -> int:
    return batch_size * context_len * config.cache_bytes_per_token(dtype_bytes)
