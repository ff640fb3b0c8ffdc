"""Paged MLA decode attention in the absorbed form, as a Triton kernel.

One decode query per sequence attends over that sequence's cached rows `[c_kv (L) | k_rope of every
head (H*R)]`, found through its block table (no gather into a contiguous copy). The query arrives
absorbed (`q_nope @ W_uk` → L values per head) and the output leaves in latent space (per head, a
mix of c_kv rows; `W_uv` is applied after), exactly as `MultiHeadLatentAttention.forward_absorbed`.

Work split: program (b, g, s) serves sequence b, a group of up to GROUP heads g, and the s-th slice
of the context. It streams the slice's rows once for the whole head group: the latent part of each
row is shared by every head (one [GROUP, L] x [L, BLOCK_K] dot), and each head's own RoPE columns are
reached by a block-diagonal query (head h's q_rope sits in columns L + h*R ...; zeros elsewhere), so
the RoPE scores are dots too. Each program keeps an online softmax (running max m, sum l, unnormalised
accumulator) and writes them out; `merge_splits` combines the slices by log-sum-exp.

Shapes and the grid depend only on the batch size and the block-table width, never on the contexts'
lengths (those are read on the device), so a launch is safe to capture in a CUDA graph. Released
blocks (-1 in a table, behind a sliding window) are never read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP = 16            # heads per program (tl.dot needs at least 16 rows); fewer heads are masked
BLOCK_K = 32          # keys per inner step
ROPE_CHUNK = 64       # RoPE columns per dot


@triton.jit
def online_softmax_step(scores, values, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One key tile of an online softmax: scores [G, K] (masked keys at -inf), values [K, D] →
    the running max m_i [G], sum l_i [G] and unnormalised output acc [G, D], updated."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))                                   # [G]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                        # a row with no key yet
    p = tl.exp(scores - m_safe[:, None])                                         # [G, K]
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)  # [G, D]
    return m_new, l_i, acc


@triton.jit
def store_split_state(acc_ptr, max_ptr, sum_ptr, acc, m_i, l_i, b, split, heads, cols, head_ok, col_ok,
                      stride_acc_b, stride_acc_s, stride_acc_h, stride_ms_b, stride_ms_s):
    """Write one context slice's softmax state for `merge_splits`: acc [B, S, H, D], max/sum [B, S, H]."""
    out = b * stride_acc_b + split * stride_acc_s + heads[:, None] * stride_acc_h + cols[None, :]
    tl.store(acc_ptr + out, acc, mask=head_ok[:, None] & col_ok[None, :])
    stat = b * stride_ms_b + split * stride_ms_s + heads
    tl.store(max_ptr + stat, m_i, mask=head_ok)
    tl.store(sum_ptr + stat, l_i, mask=head_ok)


@triton.jit
def _paged_mla_decode_split(
    q_latent_ptr, q_rope_ptr, cache_ptr, block_tables_ptr, context_lens_ptr,
    acc_ptr, max_ptr, sum_ptr,
    stride_ql_b, stride_ql_h, stride_qr_b, stride_qr_h, stride_row, stride_bt,
    stride_acc_b, stride_acc_s, stride_acc_h, stride_ms_b, stride_ms_s,
    scale, window, keys_per_split,
    NUM_HEADS: tl.constexpr, LATENT: tl.constexpr, ROPE_WIDTH: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GROUP_HEADS: tl.constexpr, LATENT_PAD: tl.constexpr, KEYS: tl.constexpr, CHUNK: tl.constexpr,
    ROPE_CHUNKS: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    heads = group * GROUP_HEADS + tl.arange(0, GROUP_HEADS)                    # [G]
    head_ok = heads < NUM_HEADS
    lat_cols = tl.arange(0, LATENT_PAD)                                          # [Lp]
    lat_ok = lat_cols < LATENT
    chunk_cols = tl.arange(0, CHUNK)                                             # [C]

    context_len = tl.load(context_lens_ptr + b)
    first = split * keys_per_split
    last = tl.minimum(first + keys_per_split, context_len)                       # keys first .. last-1
    if HAS_WINDOW:
        first = tl.maximum(first, context_len - 1 - window)                     # the query at p sees p-W .. p

    q_lat = tl.load(q_latent_ptr + b * stride_ql_b + heads[:, None] * stride_ql_h + lat_cols[None, :],
                    mask=head_ok[:, None] & lat_ok[None, :], other=0.0)          # [G, Lp]
    m_i = tl.full([GROUP_HEADS], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_HEADS], tl.float32)
    acc = tl.zeros([GROUP_HEADS, LATENT_PAD], tl.float32)

    for start in range(first, last, KEYS):
        keys = start + tl.arange(0, KEYS)                                        # [K]
        key_ok = keys < last
        block = tl.load(block_tables_ptr + b * stride_bt + keys // BLOCK_SIZE, mask=key_ok, other=-1)
        key_ok = key_ok & (block >= 0)
        rows = block.to(tl.int64) * BLOCK_SIZE + keys % BLOCK_SIZE              # [K] cache slots
        row_ptr = cache_ptr + rows[:, None] * stride_row                         # [K, 1]
        lat = tl.load(row_ptr + lat_cols[None, :], mask=key_ok[:, None] & lat_ok[None, :], other=0.0)  # [K, Lp]
        scores = tl.dot(q_lat, tl.trans(lat), input_precision=PRECISION)        # [G, K]
        for c in tl.static_range(ROPE_CHUNKS):
            cols = c * CHUNK + chunk_cols                                        # [C] within the RoPE part
            col_ok = cols < ROPE_WIDTH
            q_r = tl.load(q_rope_ptr + b * stride_qr_b + heads[:, None] * stride_qr_h + cols[None, :],
                          mask=head_ok[:, None] & col_ok[None, :], other=0.0)    # [G, C]
            k_r = tl.load(row_ptr + LATENT + cols[None, :], mask=key_ok[:, None] & col_ok[None, :], other=0.0)
            scores += tl.dot(q_r, tl.trans(k_r), input_precision=PRECISION)     # [G, K]
        scores = tl.where(key_ok[None, :], scores * scale, float("-inf"))

        m_i, l_i, acc = online_softmax_step(scores, lat, m_i, l_i, acc, PRECISION)   # values: the c_kv rows

    store_split_state(acc_ptr, max_ptr, sum_ptr, acc, m_i, l_i, b, split, heads, lat_cols, head_ok, lat_ok,
                      stride_acc_b, stride_acc_s, stride_acc_h, stride_ms_b, stride_ms_s)


def block_diagonal_rope_query(q_rope: torch.Tensor) -> torch.Tensor:
    """q_rope [B, H, R] → [B, H, H*R]: head h's R values in columns h*R .. h*R+R-1, zeros elsewhere,
    so that a dot with a cached row's RoPE part [H*R] gives head h its own RoPE score."""
    heads = q_rope.shape[1]
    eye = torch.eye(heads, dtype=q_rope.dtype, device=q_rope.device)            # [H, H]
    return (eye[None, :, :, None] * q_rope[:, :, None, :]).flatten(2)           # [B, H, H*R]


def num_splits_for(max_context: int, num_seqs: int, num_sms: int = 132) -> int:
    """Context slices per sequence: enough programs to fill the GPU at small batches, at least
    BLOCK_K keys each. Depends only on the capacity of the tables, not on actual lengths."""
    wanted = max(1, -(-2 * num_sms // max(1, num_seqs)))
    return max(1, min(wanted, -(-max_context // (4 * BLOCK_K))))


def merge_splits(acc: torch.Tensor, maxes: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Combine per-slice online-softmax states: acc [B, S, H, L], maxes/sums [B, S, H] → [B, H, L]."""
    top = maxes.max(dim=1, keepdim=True).values                                  # [B, 1, H]
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight = torch.where(sums > 0, torch.exp(maxes - top), torch.zeros_like(maxes))  # [B, S, H]
    numerator = (acc * weight[..., None]).sum(dim=1)                             # [B, H, L]
    denominator = (sums * weight).sum(dim=1)                                     # [B, H]
    return numerator / denominator.clamp_min(1e-30)[..., None]


def paged_mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, cache_layer: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                     scale: float, window: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Absorbed MLA attention of one decode query per sequence.

    q_latent [B, H, L], q_rope [B, H, R] (post-RoPE), cache_layer [S, L + H*R] rows,
    block_tables [B, MB] (slot = block * block_size + offset; -1 = released), context_lens [B]
    (the query is the last position) → out_latent [B, H, L] in float32.
    """
    num_seqs, heads, latent = q_latent.shape
    rope = q_rope.shape[-1]
    assert cache_layer.shape[1] == latent + heads * rope, "cache rows are [c_kv | k_rope of every head]"
    dtype = cache_layer.dtype
    q_latent = q_latent.to(dtype).contiguous()
    q_rope_bd = block_diagonal_rope_query(q_rope.to(dtype)).contiguous()        # [B, H, H*R]
    block_tables = block_tables.contiguous()
    max_context = block_tables.shape[1] * block_size
    splits = num_splits or num_splits_for(max_context, num_seqs)
    keys_per_split = -(-max_context // splits)
    latent_pad = max(16, triton.next_power_of_2(latent))
    chunk = min(ROPE_CHUNK, max(16, triton.next_power_of_2(heads * rope)))
    acc = torch.empty(num_seqs, splits, heads, latent_pad, dtype=torch.float32, device=q_latent.device)
    maxes = torch.empty(num_seqs, splits, heads, dtype=torch.float32, device=q_latent.device)
    sums = torch.empty_like(maxes)
    grid = (num_seqs, triton.cdiv(heads, GROUP), splits)
    _paged_mla_decode_split[grid](
        q_latent, q_rope_bd, cache_layer, block_tables, context_lens, acc, maxes, sums,
        q_latent.stride(0), q_latent.stride(1), q_rope_bd.stride(0), q_rope_bd.stride(1),
        cache_layer.stride(0), block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2), maxes.stride(0), maxes.stride(1),
        scale, window if window is not None else 0, keys_per_split,
        NUM_HEADS=heads, LATENT=latent, ROPE_WIDTH=heads * rope, BLOCK_SIZE=block_size,
        GROUP_HEADS=GROUP, LATENT_PAD=latent_pad, KEYS=BLOCK_K, CHUNK=chunk,
        ROPE_CHUNKS=triton.cdiv(heads * rope, chunk), HAS_WINDOW=window is not None,
        PRECISION="ieee" if dtype == torch.float32 else None,   # 16-bit inputs: the default
    )
    return merge_splits(acc[..., :latent], maxes, sums)
