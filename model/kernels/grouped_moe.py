"""Routed-expert MoE as grouped GEMMs in Triton, with static shapes (safe in CUDA graphs).

The T*k (token, expert) pairs of a step are sorted by expert, and each expert's run is padded to a
multiple of BLOCK_M, in a buffer whose length depends only on T, k and E. Program (m, n) computes one
BLOCK_M x BLOCK_N tile of one expert's GEMM: it gathers its rows (x[token] or the hidden of the pair),
multiplies by that expert's weight tile, and scatters the result back by pair index. Only the
(token, expert) pairs routing chose are computed, and each expert's weights are read once per
BLOCK_M pairs, so a batch of 256 costs about what 2 of 7 experts do, not all 7.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 32


@triton.jit
def _grouped_gemm(
    a_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, row_scale_ptr,
    num_pairs, n_out, k_in, stride_a, stride_we, stride_wn, stride_out,
    ROW_DIVISOR: tl.constexpr, HAS_SCALE: tl.constexpr, NUM_EXPERTS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    tile_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + block)
    if expert < NUM_EXPERTS:                                   # blocks past the last expert's run idle
        pairs = tl.load(sorted_pairs_ptr + block * BM + tl.arange(0, BM))          # [BM]
        pair_ok = pairs < num_pairs                            # padding holds num_pairs
        rows = tl.where(pair_ok, pairs // ROW_DIVISOR, 0)      # the row of A each pair reads
        cols = tile_n * BN + tl.arange(0, BN)                  # [BN] output features
        col_ok = cols < n_out
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, k_in, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < k_in
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_a + ks[None, :],
                        mask=pair_ok[:, None] & k_ok[None, :], other=0.0)                      # [BM, BK]
            w = tl.load(w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None],
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)                       # [BK, BN]
            acc += tl.dot(a, w, input_precision=PRECISION)
        if HAS_SCALE:
            acc = acc * tl.load(row_scale_ptr + pairs, mask=pair_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + pairs[:, None].to(tl.int64) * stride_out + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=pair_ok[:, None] & col_ok[None, :])


def sort_pairs_by_expert(top_e: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """top_e [T, k] → (sorted_pairs [P], block_expert [P / block_m]) with P fixed by T, k, E.

    sorted_pairs lists pair indices (t*k + j) grouped by expert, each expert's run padded to a
    multiple of block_m with the value T*k; block_expert names the expert of each block of block_m
    entries (num_experts for the idle blocks at the end). No host syncs."""
    flat = top_e.flatten()                                                        # [T*k]
    num_pairs = flat.numel()
    capacity = -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))                           # [E] (one_hot would sync)
    padded = (counts + block_m - 1) // block_m * block_m                          # [E]
    padded_end = padded.cumsum(0)                                                 # [E]
    order = torch.argsort(flat, stable=True)                                      # pairs by expert
    sorted_experts = flat[order]
    first_of_expert = counts.cumsum(0) - counts                                   # [E]
    rank = torch.arange(num_pairs, device=flat.device) - first_of_expert[sorted_experts]
    position = padded_end[sorted_experts] - padded[sorted_experts] + rank
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.long, device=flat.device)
    sorted_pairs[position] = order
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)       # E past the end
    return sorted_pairs, block_expert


def _launch(a, weights, out, sorted_pairs, block_expert, row_divisor, num_pairs, row_scale=None):
    num_experts, n_out, k_in = weights.shape
    grid = (block_expert.numel(), triton.cdiv(n_out, BLOCK_N))
    _grouped_gemm[grid](
        a, weights, out, sorted_pairs, block_expert, row_scale if row_scale is not None else out,
        num_pairs, n_out, k_in, a.stride(0), weights.stride(0), weights.stride(1), out.stride(0),
        ROW_DIVISOR=row_divisor, HAS_SCALE=row_scale is not None, NUM_EXPERTS=num_experts,
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, PRECISION="ieee" if a.dtype == torch.float32 else None)


def grouped_moe(x: torch.Tensor, top_w: torch.Tensor, top_e: torch.Tensor, gate: torch.Tensor,
                up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Σ_j top_w[t, j] · down_e(silu(gate_e(x_t)) · up_e(x_t)), e = top_e[t, j].

    x [T, d], top_w/top_e [T, k], gate/up [E, h, d], down [E, d, h] (contiguous) → [T, d]."""
    num_tokens, k = top_e.shape
    num_pairs = num_tokens * k
    hidden = gate.shape[1]
    x = x.contiguous()
    sorted_pairs, block_expert = sort_pairs_by_expert(top_e, gate.shape[0])
    gate_out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)              # [T*k, h]
    up_out = torch.empty_like(gate_out)
    _launch(x, gate, gate_out, sorted_pairs, block_expert, k, num_pairs)
    _launch(x, up, up_out, sorted_pairs, block_expert, k, num_pairs)
    act = F.silu(gate_out) * up_out                                                         # [T*k, h]
    y = torch.empty(num_pairs, x.shape[1], dtype=x.dtype, device=x.device)                  # [T*k, d]
    _launch(act, down, y, sorted_pairs, block_expert, 1, num_pairs, row_scale=top_w.flatten().contiguous())
    return y.view(num_tokens, k, -1).sum(dim=1)
