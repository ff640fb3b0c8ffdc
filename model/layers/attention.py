"""Attention over the paged cache: writing a step's rows, gathering each sequence's context, and the
masked attention forms the families share (fused grouped-query attention, the float32 masked softmax,
a product over a context every head shares).

A cache layer is one tensor of rows `[num_slots, row_width]`; `PagedBatch` (model/cache/batch.py)
says where this step's rows go (`slot_mapping`) and which rows each sequence reads (`context_slots`,
`attn_mask`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.cache.batch import PagedBatch


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
    queries = pad_queries(q, batch).transpose(1, 2)                                  # [B, H, Q, hd]
    causal = batch.plain_causal
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=None if causal else batch.attn_mask[:, None],
                                         is_causal=causal, scale=scale,
                                         enable_gqa=keys.shape[1] != queries.shape[1])  # [B, H, Q, hd]
    return unpad_queries(out.transpose(1, 2), batch)                                 # [T, H, hd]


def masked_softmax(scores: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """scores [B, H, Q, K] → attention weights, in float32, over the keys each query may see."""
    scores = scores.float().masked_fill(~batch.attn_mask[:, None, :, :], float("-inf"))
    return torch.softmax(scores, dim=-1)
