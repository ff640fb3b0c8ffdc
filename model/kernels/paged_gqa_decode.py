"""Paged grouped-query attention for decode steps, as a Triton kernel (the Llama and SmartLLM families).

Cached rows are `[K of every kv head (post-RoPE) | V of every kv head]`. Program (b, g, s) serves
sequence b, kv head g with the query heads of its group (contiguous: query head h reads kv head
h // group), and the s-th slice of the context: it streams that kv head's K and V once for the whole
group, keeps an online softmax, and writes its partial state; the softmax step, the state's store and
`merge_splits` are the MLA kernel's. Shapes and grid depend only on the batch size and the table width, so
the launch can be captured in a CUDA graph; released blocks (-1) are never read, and a sliding window
starts each query's keys at p - W.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.kernels.paged_mla_decode import (BLOCK_K, merge_splits, num_splits_for, online_softmax_step,
                                           store_split_state)

MIN_GROUP = 16        # query rows per program (tl.dot needs 16); a smaller group is masked


@triton.jit
def _paged_gqa_decode_split(
    q_ptr, cache_ptr, block_tables_ptr, context_lens_ptr, acc_ptr, max_ptr, sum_ptr,
    stride_qb, stride_qh, stride_row, stride_bt, stride_acc_b, stride_acc_s, stride_acc_h,
    stride_ms_b, stride_ms_s, scale, window, keys_per_split,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr, KEYS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    members = tl.arange(0, GROUP_PAD)                                          # [G] within the group
    member_ok = members < GROUP
    heads = kv_head * GROUP + members                                          # query heads
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM

    context_len = tl.load(context_lens_ptr + b)
    first = split * keys_per_split
    last = tl.minimum(first + keys_per_split, context_len)
    if HAS_WINDOW:
        first = tl.maximum(first, context_len - 1 - window)

    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=member_ok[:, None] & dim_ok[None, :], other=0.0)          # [G, D]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    k_col = kv_head * HEAD_DIM + dims                                          # this head's K columns
    v_col = (NUM_KV_HEADS + kv_head) * HEAD_DIM + dims                         # and its V columns

    for start in range(first, last, KEYS):
        keys = start + tl.arange(0, KEYS)
        key_ok = keys < last
        block = tl.load(block_tables_ptr + b * stride_bt + keys // BLOCK_SIZE, mask=key_ok, other=-1)
        key_ok = key_ok & (block >= 0)
        row_ptr = cache_ptr + (block.to(tl.int64) * BLOCK_SIZE + keys % BLOCK_SIZE)[:, None] * stride_row
        tile_ok = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(row_ptr + k_col[None, :], mask=tile_ok, other=0.0)        # [K, D]
        v = tl.load(row_ptr + v_col[None, :], mask=tile_ok, other=0.0)        # [K, D]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale     # [G, K]
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc, PRECISION)

    store_split_state(acc_ptr, max_ptr, sum_ptr, acc, m_i, l_i, b, split, heads, dims, member_ok, dim_ok,
                      stride_acc_b, stride_acc_s, stride_acc_h, stride_ms_b, stride_ms_s)


def paged_gqa_decode(q: torch.Tensor, cache_layer: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, block_size: int, num_kv_heads: int, scale: float,
                     window: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """One decode query per sequence over paged [K | V] rows.

    q [B, H, hd] (post-RoPE), cache_layer [S, 2*KV*hd], block_tables [B, MB] (-1 = released),
    context_lens [B] (the query is the last position) → [B, H, hd] in float32.
    """
    num_seqs, heads, head_dim = q.shape
    assert heads % num_kv_heads == 0 and cache_layer.shape[1] == 2 * num_kv_heads * head_dim
    dtype = cache_layer.dtype
    q = q.to(dtype).contiguous()
    block_tables = block_tables.contiguous()
    max_context = block_tables.shape[1] * block_size
    splits = num_splits or num_splits_for(max_context, num_seqs * num_kv_heads)
    keys_per_split = -(-max_context // splits)
    group = heads // num_kv_heads
    acc = torch.empty(num_seqs, splits, heads, head_dim, dtype=torch.float32, device=q.device)
    maxes = torch.empty(num_seqs, splits, heads, dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxes)
    _paged_gqa_decode_split[(num_seqs, num_kv_heads, splits)](
        q, cache_layer, block_tables, context_lens, acc, maxes, sums,
        q.stride(0), q.stride(1), cache_layer.stride(0), block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2), maxes.stride(0), maxes.stride(1),
        scale, window if window is not None else 0, keys_per_split,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        GROUP_PAD=max(MIN_GROUP, triton.next_power_of_2(group)),
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)), KEYS=BLOCK_K, HAS_WINDOW=window is not None,
        PRECISION="ieee" if dtype == torch.float32 else None,
    )
    return merge_splits(acc, maxes, sums)
