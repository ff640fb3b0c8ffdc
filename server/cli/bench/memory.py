"""The machine's measured memory bandwidth and the bytes one decode step must move."""
from __future__ import annotations

import time

import torch
from torch import nn

from model.config import BaseModelConfig
from model.layers.quantize import head_kind
from model.layers.linear import Linear
from model.layers.quantized_linear import (FLOAT32, QuantizedLinear, format_bytes, format_supported, quantized_head,
                                           tied_head_table)
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


def _hypothetical_bytes(out_features: int, in_features: int, quantization: str) -> int:
    """Bytes a product by a [out, in] weight would read were the model held as `quantization` (none:
    float32; int8/int4 where the shape allows, float32 elsewhere)."""
    fmt = quantization if quantization in ("int8", "int4") and format_supported(quantization, out_features,
                                                                                  in_features) else FLOAT32
    return format_bytes(fmt, out_features, in_features)


def weight_bytes_touched(model: nn.Module, batch_size: int, quantization: str | None = None) -> int:
    """Bytes of weights one decode step of `batch_size` tokens reads: every parameter once, except
    that an embedding table gives only the looked-up rows (unless the head shares it) and the experts
    of a MoE (a module with `top_k` and an expert list, `routed_experts` or `experts`) count by the
    expected number touched (each token picks top_k of its E experts uniformly at random). A
    `QuantizedLinear` reads its weight in the format it uses for that many rows (an expert: for the
    rows it expects). `quantization` ("none", "int8", "int4") counts every Linear, and a tied head,
    as if the model were held that way instead (`customllm weights inspect`; heads as
    `quantize_model` holds them: never below int8)."""
    head = None if quantized_head(model) else output_head_weight(model)
    read_fraction: dict[int, float] = {}              # id(parameter or Linear) -> fraction of it read
    rows: dict[int, int] = {}                         # id(Linear) -> rows it multiplies per step
    for module in model.modules():
        experts = getattr(module, "routed_experts", None) or getattr(module, "experts", None)
        if isinstance(experts, nn.ModuleList) and hasattr(module, "top_k"):
            untouched = (1 - module.top_k / len(experts)) ** batch_size   # chance no token picks an expert
            for part in [*experts.parameters(), *experts.modules()]:
                read_fraction[id(part)] = 1 - untouched
                rows[id(part)] = max(1, round(batch_size * module.top_k / len(experts)))
        elif isinstance(module, nn.Embedding) and module.weight is not head:
            read_fraction[id(module.weight)] = min(batch_size, module.num_embeddings) / module.num_embeddings
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, Linear) and hasattr(m, "weight")}
    table = tied_head_table(model)
    total = 0.0
    for param in model.parameters():
        if quantization is not None and (id(param) in linear_weights or (table is not None and param is table)):
            continue                                  # counted below, as held under `quantization`
        total += param.numel() * param.element_size() * read_fraction.get(id(param), 1.0)
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        if quantization is not None:
            kind = head_kind(quantization) if module is getattr(model, "lm_head", None) else quantization
            total += _hypothetical_bytes(module.out_features, module.in_features, kind) \
                * read_fraction.get(id(module), 1.0)
        elif isinstance(module, QuantizedLinear):
            total += module.weight_bytes(rows.get(id(module), batch_size)) * read_fraction.get(id(module), 1.0)
    if quantization is not None and table is not None:
        total += _hypothetical_bytes(*table.shape, head_kind(quantization))
        if quantization != "none":                    # a quantized copy is the head; the table is looked up
            total += min(batch_size, table.shape[0]) * table.shape[1] * 4
    return round(total)


def cache_bytes_read(config: BaseModelConfig, batch_size: int, context_len: int, dtype_bytes: int) -> int:
    return batch_size * context_len * config.cache_bytes_per_token(dtype_bytes)
