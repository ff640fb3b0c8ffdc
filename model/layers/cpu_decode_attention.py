"""Decode attention on the CPU that reads the paged cache where it sits: the C kernel of
model/layers/native/paged_decode.c, with the signatures of the Triton decode kernels
(model/kernels), so a family's attention layers take it through the same `use_decode_kernel` hook.

A decode step then copies no context (the gather path's `cache[context_slots]` is one
[B, K, row] copy per layer, plus a cast when the cache is not in the compute dtype) and needs none
of the gather path's per-step index tensors and mask. Scores and sums are float32; the cache may be
float32, bfloat16 or float16.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from model.layers import native

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_function = None
_offsets: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def kernel_function():
    """The C entry point, or None when it cannot be built here (no compiler)."""
    global _function
    if _function is None:
        _function = native.function("paged_decode", "paged_decode", ctypes.c_int,
                                    [_PTR, _I64, _I64, _PTR, ctypes.c_int, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64,
                                     _PTR, _I64, _PTR, _I64, _PTR, _I64, ctypes.c_float, _I64, _PTR])
    return _function


def available() -> bool:
    return kernel_function() is not None


def _paged_decode(q: torch.Tensor, cache_layer: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, block_size: int, offsets, a_w: int, b_w: int, v_w: int,
                  scale: float, window: int | None) -> torch.Tensor:
    """q [B, H, a_w + b_w] → [B, H, v_w] float32; `offsets` = (a_off, b_off, v_off), [H] int64 each.
    Inside torch.compile the call goes through the registered op (one opaque node of the graph)."""
    if torch.compiler.is_compiling():
        return torch.ops.customllm.paged_decode(q.float(), cache_layer, block_tables, context_lens, *offsets,
                                                block_size, a_w, b_w, v_w, scale, -1 if window is None else window)
    return _call(q, cache_layer, block_tables, context_lens, block_size, offsets, a_w, b_w, v_w, scale, window)


def _call(q, cache_layer, block_tables, context_lens, block_size, offsets, a_w, b_w, v_w, scale, window):
    num_seqs, heads, _ = q.shape
    q = q.float()
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert cache_layer.is_contiguous() and cache_layer.dtype in _DTYPES, "cache rows: contiguous float32/16"
    tables = block_tables if block_tables.is_contiguous() else block_tables.contiguous()
    lens = context_lens if context_lens.is_contiguous() else context_lens.contiguous()
    assert tables.dtype == torch.int64 and lens.dtype == torch.int64
    out = torch.empty(num_seqs, heads, v_w, dtype=torch.float32)
    a_off, b_off, v_off = offsets
    status = kernel_function()(
        q.data_ptr(), q.stride(0), q.stride(1), cache_layer.data_ptr(), _DTYPES[cache_layer.dtype],
        cache_layer.shape[1], tables.data_ptr(), tables.shape[1], lens.data_ptr(), block_size, num_seqs,
        heads, a_off.data_ptr(), a_w, b_off.data_ptr(), b_w, v_off.data_ptr(), v_w, scale,
        -1 if window is None else window, out.data_ptr())
    if status != 0:
        raise MemoryError("paged_decode: no memory for the scores")
    return out


@torch.library.custom_op("customllm::paged_decode", mutates_args=())
def _paged_decode_op(q: torch.Tensor, cache_layer: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, a_off: torch.Tensor, b_off: torch.Tensor, v_off: torch.Tensor,
                     block_size: int, a_w: int, b_w: int, v_w: int, scale: float, window: int) -> torch.Tensor:
    return _call(q, cache_layer, block_tables, context_lens, block_size, (a_off, b_off, v_off), a_w, b_w, v_w, scale,
                 None if window < 0 else window)


@_paged_decode_op.register_fake
def _(q, cache_layer, block_tables, context_lens, a_off, b_off, v_off, block_size, a_w, b_w, v_w, scale, window):
    return q.new_empty(q.shape[0], q.shape[1], v_w, dtype=torch.float32)                  # [B, H, v_w]


def _gqa_offsets(heads: int, kv_heads: int, head_dim: int):
    key = ("gqa", heads, kv_heads, head_dim)
    if key not in _offsets:
        kv_of_head = torch.arange(heads) // (heads // kv_heads)                          # [H]
        _offsets[key] = (kv_of_head * head_dim, torch.zeros(heads, dtype=torch.long),
                         (kv_heads + kv_of_head) * head_dim)
    return _offsets[key]


def _mla_offsets(heads: int, latent: int, rope: int):
    key = ("mla", heads, latent, rope)
    if key not in _offsets:
        _offsets[key] = (torch.zeros(heads, dtype=torch.long), latent + torch.arange(heads) * rope,
                         torch.zeros(heads, dtype=torch.long))
    return _offsets[key]


def cpu_paged_gqa_decode(q: torch.Tensor, cache_layer: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, block_size: int, num_kv_heads: int, scale: float,
                         window: int | None = None) -> torch.Tensor:
    """As model/kernels/paged_gqa_decode: q [B, H, hd] (post-RoPE) over rows
    [K of every kv head | V of every kv head], query head h reading kv head h // (H / KV)
    → [B, H, hd] float32."""
    heads, head_dim = q.shape[1], q.shape[2]
    assert heads % num_kv_heads == 0 and cache_layer.shape[1] == 2 * num_kv_heads * head_dim
    return _paged_decode(q, cache_layer, block_tables, context_lens, block_size,
                         _gqa_offsets(heads, num_kv_heads, head_dim), head_dim, 0, head_dim, scale, window)


def cpu_paged_mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, cache_layer: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                         scale: float, window: int | None = None) -> torch.Tensor:
    """As model/kernels/paged_mla_decode: q_latent [B, H, L], q_rope [B, H, R] (post-RoPE) over rows
    [c_kv (L) | k_rope of every head (H*R)]; head h's key is [c_kv | its k_rope], its value c_kv
    → out_latent [B, H, L] float32."""
    heads, latent, rope = q_latent.shape[1], q_latent.shape[2], q_rope.shape[2]
    assert cache_layer.shape[1] == latent + heads * rope, "cache rows are [c_kv | k_rope of every head]"
    q = torch.cat([q_latent.float(), q_rope.float()], dim=-1)                            # [B, H, L + R]
    return _paged_decode(q, cache_layer, block_tables, context_lens, block_size,
                         _mla_offsets(heads, latent, rope), latent, rope, latent, scale, window)


CPU_KERNELS = {"paged_gqa_decode": cpu_paged_gqa_decode, "paged_mla_decode": cpu_paged_mla_decode}


def use_cpu_decode_attention(model: nn.Module) -> int:
    """Route the decode-only steps of every attention layer of `model` through the CPU kernel of the
    kind its family names; returns how many layers now use it (0: the family has none, e.g.
    ShomsherLLM, whose keys are re-derived per position, or no compiler here)."""
    from model.kernels import attention_layers
    from model.registry import family

    name = family(model.config.family).decode_kernel
    if name is None or not available():
        return 0
    layers = attention_layers(model)
    for layer in layers:
        layer.use_decode_kernel(CPU_KERNELS[name])
    return len(layers)
