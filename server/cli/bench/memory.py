"""The machine's measured memory bandwidth and the bytes one decode step must move."""
from __future__ import annotations

import time

import torch
from torch import nn

from model.config import BaseModelConfig
from model.registry import output_head_weight


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
    """Bytes of parameters one decode step of `batch_size` tokens reads: every parameter once, except
    that an embedding table gives only the looked-up rows (unless the head shares it) and the experts
    of a MoE (a module with `top_k` and an expert list, `routed_experts` or `experts`) count by the
    expected number touched (each token picks top_k of its E experts uniformly at random)."""
    head = output_head_weight(model)
    read_fraction: dict[int, float] = {}              # id(parameter) -> fraction of it read
    for module in model.modules():
        experts = getattr(module, "routed_experts", None) or getattr(module, "experts", None)
        if isinstance(experts, nn.ModuleList) and hasattr(module, "top_k"):
            untouched = (1 - module.top_k / len(experts)) ** batch_size   # chance no token picks an expert
            for param in experts.parameters():
                read_fraction[id(param)] = 1 - untouched
        elif isinstance(module, nn.Embedding) and module.weight is not head:
            read_fraction[id(module.weight)] = min(batch_size, module.num_embeddings) / module.num_embeddings
    return round(sum(param.numel() * param.element_size() * read_fraction.get(id(param), 1.0)
                     for param in model.parameters()))


def cache_bytes_read(config: BaseModelConfig, batch_size: int, context_len: int, dtype_bytes: int) -> int:
    return batch_size * context_len * config.cache_bytes_per_token(dtype_bytes)
