"""Attention over the paged cache: writing a step's rows, gathering each sequence's context, and the
masked attention forms the families share (fused grouped-query attention, the float32 masked softmax,
a product over a context every head shares).

A cache layer is one tensor of rows `[num_slots, row_width]`; `PagedBatch` (model/cache/batch.py)
says where this step's rows go (`slot_mapping`) and which rows each sequence reads (`context_slots`,
`attn_mask`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from model.cache.batch import PagedBatch


class KernelAttention:
    """Mixin of an attention module whose decode-only steps can run in a fused kernel of
    model/kernels instead of gathering the context: `use_decode_kernel(kernel)` sets it (None: back
    to PyTorch). Which kernel (and so which signature) a family's layers take is named by its
    `FamilyRecord.decode_kernel`; `model.kernels.use_triton_decode_attention` sets it model-wide."""

    decode_kernel: Callable | None = None
    # prompt chunks' attention computed in this dtype (None: the activations' own); only families
    # whose chunks run paged_grouped_query_attention take one (HAS_PREFILL_DTYPE), set by
    # model/layers/prefill_attention.py where it measures faster and the mode is not exact
    HAS_PREFILL_DTYPE = False
    prefill_dtype: torch.dtype | None = None
    # a lone prompt's attention from position 0 in the tile-unit kernel (model/layers/prompt_ops.py), in
    # families that can (TILE_ATTENTION), set where measured faster than PyTorch's bfloat16 one
    TILE_ATTENTION = False
    prompt_tile_attention = False

    def use_decode_kernel(self, kernel: Callable | None) -> None:
        self.decode_kernel = kernel


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention scores and sums are computed in: the activations' own, except float16 on a
    CPU, whose batched matmuls are several times slower there than converting to float32 and back."""
    return torch.float32 if x.dtype == torch.float16 and x.device.type == "cpu" else x.dtype


def write_rows(cache_layer: torch.Tensor, batch: PagedBatch, rows: torch.Tensor) -> None:
    """Store this step's rows: cache_layer [S, W] at batch.slot_mapping ← rows [T, W]."""
    cache_layer.index_copy_(0, batch.slot_mapping, rows.to(cache_layer.dtype))


def gather_context(cache_layer: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """Each sequence's context rows: [B, K, W]."""
    return cache_layer[batch.context_slots]


def pad_queries(x: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """Flat [T, ...] → per sequence [B, Q, ...] (pad rows are copies of token 0, masked later)."""
    return x[batch.query_index]


def unpad_queries(x: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """Per sequence [B, Q, ...] → flat [T, ...] in the batch's token order."""
    return x[batch.query_valid]


def matmul_shared_context(x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """x [B, H, Q, K] @ context [B, K, C] that every head shares → [B, H, Q, C], as one
    [H*Q, K] @ [K, C] product per sequence: broadcasting `x @ context[:, None]` would first copy
    the context once per head (the latent cache H times over)."""
    b, h, q, k = x.shape
    return (x.reshape(b, h * q, k) @ context).view(b, h, q, -1)


def grouped_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: PagedBatch,
                            scale: float) -> torch.Tensor:
    """Attention of a step's flat queries q [T, H, hd] over each sequence's keys and values
    [B, KV, K, hd], query head h reading kv head h // (H / KV), masked by batch.attn_mask (causal,
    window, released blocks) → [T, H, hd]. PyTorch's fused attention: no [Q, K] score matrix is
    kept, which is what a long prefill chunk costs otherwise."""
    causal = batch.plain_causal          # one sequence from position 0: its queries need no padding
    queries = (q[None] if causal else pad_queries(q, batch)).transpose(1, 2)         # [B, H, Q, hd]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=None if causal else batch.attn_mask[:, None],
                                         is_causal=causal, scale=scale,
                                         enable_gqa=keys.shape[1] != queries.shape[1])  # [B, H, Q, hd]
    return out[0].transpose(0, 1) if causal else unpad_queries(out.transpose(1, 2), batch)   # [T, H, hd]


def masked_softmax(scores: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """scores [B, H, Q, K] → attention weights, in float32, over the keys each query may see."""
    scores = scores.float().masked_fill(~batch.attn_mask[:, None, :, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def paged_grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PagedBatch,
                                  cache_layer: torch.Tensor, scale: float, decode_kernel=None,
                                  prefill_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One layer's grouped-query attention over the paged `[K of every kv head | V of every kv head]`
    cache → [T, H*hd] in q's dtype, ready for the output projection.

    q [T, H, hd] and k [T, KV, hd] post-RoPE, v [T, KV, hd] or [T, KV*hd]: this step's new tokens;
    query head h reads kv head h // (H / KV) (contiguous groups), so K/V are never repeated. Scores
    are `scale · q·k` (a caller whose q is pre-scaled passes 1.0). The new [K | V] rows are written
    first; then a decode-only step runs in `decode_kernel` (paged_gqa_decode's signature) when one
    is set, or over the gathered context as one grouped product per sequence; a step with prefill
    chunks runs PyTorch's fused attention, in `prefill_dtype` when one is given. Without a kernel,
    float16 on the CPU computes in float32 (`attention_dtype`)."""
    out_dtype, heads, hd = q.dtype, q.shape[1], q.shape[2]
    kv = k.shape[1]
    write_rows(cache_layer, batch, torch.cat([k.flatten(1), v.flatten(1)], dim=-1))      # [T, 2*KV*hd]
    if batch.is_decode_only and decode_kernel is not None:
        out = decode_kernel(q, cache_layer, batch.block_tables, batch.context_lens, batch.block_size, kv,
                            scale, batch.window)                                         # [B, H, hd]
        return out.flatten(1).to(out_dtype)
    dtype = prefill_dtype if prefill_dtype is not None and not batch.is_decode_only else attention_dtype(q)
    context = gather_context(cache_layer, batch)                                         # [B, K, 2*KV*hd]
    if context.dtype != dtype:
        context = context.to(dtype)
    if q.dtype != dtype:
        q = q.to(dtype)
    keys = context[..., : kv * hd].unflatten(-1, (kv, hd)).transpose(1, 2)              # [B, KV, K, hd]
    values = context[..., kv * hd:].unflatten(-1, (kv, hd)).transpose(1, 2)             # [B, KV, K, hd]
    if batch.is_decode_only:
        # one query per sequence, in sequence order: the query heads of a kv head are its group
        num_seqs, group = batch.num_seqs, heads // kv
        scores = q.view(num_seqs, kv, group, hd) @ keys.transpose(-1, -2)                # [B, KV, G, K]
        if scale != 1.0:
            scores = scores * scale
        attn = masked_softmax(scores.view(num_seqs, heads, 1, -1), batch)               # [B, H, 1, K]
        out = attn.to(dtype).view(num_seqs, kv, group, -1) @ values                      # [B, KV, G, hd]
        return out.view(num_seqs, heads * hd).to(out_dtype)                              # [T, H*hd]
    out = grouped_query_attention(q, keys, values, batch, scale)                         # [T, H, hd]
    return out.reshape(-1, heads * hd).to(out_dtype)                                     # [T, H*hd]
