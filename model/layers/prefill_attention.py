"""Prompt chunks' attention in bfloat16 where that measures faster (a CPU, modes that are not exact).

A prompt's attention grows with the square of its length: for the built-in model on an Intel Xeon
with AMX, PyTorch's fused attention over 2,000 tokens took 26 ms a layer in float32 and 8 ms in
bfloat16 (784 against 231 ms of a 1.8 s prefill; docs/benchmarks.md). Where the weights are
quantized or held in bfloat16 for prompts (`--dtype auto`, `--quantization`), the activations are
already rounded to 16 bits or to int8 before each product, so queries, keys and values rounded to
bfloat16 (scores and sums accumulated in float32 by the fused kernel) cost little more precision;
exact float32 (`--dtype float32`) never takes this. Both dtypes are timed once per machine and
attention shape, at TOKENS tokens, and cached with the kernel timings; CPUs without fast bfloat16
keep float32. On a CPU with AMX-BF16, a prompt alone in its step from position 0 (the time to a first
token) may instead run in a kernel of the tile unit (native/prompt_attention.c), timed alike: 1.55× as
fast as PyTorch's at 2,000 tokens on the Xeon of docs/benchmarks.md, about as fast at 512.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import prompt_ops
from model.layers.attention import KernelAttention
from model.layers.kernel_choice import Timings

log = logging.getLogger("customllm.kernels")

TOKENS = 512                    # the prompt length timed
RUNS = 3                        # timed runs after one warm-up (the best counts)


def attention_shape(module: KernelAttention) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) of a grouped-query attention module."""
    cfg = module.cfg
    heads = getattr(cfg, "num_heads", None) or cfg.n_heads
    kv_heads = getattr(cfg, "num_kv_heads", None) or cfg.n_kv_heads
    return heads, kv_heads, cfg.head_dim


def time_attention(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, tokens: int = TOKENS) -> float:
    """Best seconds of PyTorch's fused causal attention over one prompt of `tokens` in `dtype`."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, tokens, head_dim, generator=generator).to(dtype)        # [1, H, T, hd]
    k, v = (torch.randn(1, kv_heads, tokens, head_dim, generator=generator).to(dtype) for _ in range(2))
    best = float("inf")
    with torch.inference_mode():
        for run in range(RUNS + 1):
            started = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
            if run:
                best = min(best, time.perf_counter() - started)
    return best


def time_tile_attention(heads: int, kv_heads: int, head_dim: int, tokens: int = TOKENS) -> float:
    """Best seconds of the tile-unit kernel (model/layers/prompt_ops.py) over one prompt of `tokens`."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(tokens, heads, head_dim, generator=generator).bfloat16()                 # [T, H, hd]
    kv = torch.randn(tokens, 2 * kv_heads * head_dim, generator=generator).bfloat16()        # [T, 2*KV*hd]
    best = float("inf")
    for run in range(RUNS + 1):
        started = time.perf_counter()
        prompt_ops.causal_attention(q, kv, kv_heads)
        if run:
            best = min(best, time.perf_counter() - started)
    return best


def use_prefill_attention_dtype(model: nn.Module, timings: Timings) -> torch.dtype | None:
    """Set every grouped-query attention module of `model` (float32 activations on the CPU) to
    compute prompt chunks in bfloat16 when that is measured faster than float32 at its shape, and,
    where its family can (`TILE_ATTENTION`), a lone prompt's in the tile-unit kernel when that is
    measured faster still; returns the dtype set, or None (nothing changed)."""
    modules = [m for m in model.modules() if isinstance(m, KernelAttention) and m.HAS_PREFILL_DTYPE]
    if not modules:
        return None
    shape = attention_shape(modules[0])
    key = f"prefill attention:{shape[0]}x{shape[1]}x{shape[2]}@{TOKENS}"
    seconds = {str(dtype).removeprefix("torch."): timings.measured(key, str(dtype).removeprefix("torch."), 1,
                                                                     lambda dtype=dtype: [time_attention(dtype, *shape)])[0]
               for dtype in (torch.float32, torch.bfloat16)}
    faster = seconds["bfloat16"] < seconds["float32"]
    tiles = [m for m in modules if m.TILE_ATTENTION] if faster and prompt_ops.has_tile_attention() \
        and prompt_ops.tile_attention_fits(*shape) else []
    if tiles:
        seconds["bfloat16 tiles"] = timings.measured(key, "bfloat16-tiles", 1, lambda: [time_tile_attention(*shape)])[0]
    timings.save()
    log.info("prompt attention at %d tokens: %s a layer: %s", TOKENS,
             ", ".join(f"{name} {value * 1e3:.2f} ms" for name, value in seconds.items()),
             min(seconds, key=seconds.get))
    if not faster:
        return None
    for module in modules:
        module.prefill_dtype = torch.bfloat16
        module.prompt_tile_attention = module in tiles and seconds["bfloat16 tiles"] < seconds["bfloat16"]
    return torch.bfloat16
