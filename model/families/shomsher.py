"""ShomsherLLM: latent attention with DeRoPE, sandwich norms, top-1 softmax MoE. Its config, presets
and `FAMILY` record are here.

Module and parameter names are the seed's (`t_blocks.{i}.mhattention.W_dkv.weight`, …), so its
`model_state_dict` loads with strict key checks.

DeRoPE rotates the *first* `rope_dim` dims of each head's concatenated `[W_u* part | W_*r part]`
vector (pairs (i, i + rope_dim/2), angle = (p / 40) · 10000^(-2j/rope_dim)), so the W_uk dims are
mixed into the rotation and the last W_*r dims are not rotated at all.

Cache row per token and layer: `c_kv` only (50 values for the published model). Because the rotation
mixes W_uk into the rotated block, keys cannot be folded into the query: each step re-expands the
context's keys from `c_kv` at their positions (cheap at d 200). `W_uv` is folded into the output:
attention weights are applied to the latent rows and the per-head `W_uv` afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from model.cache.batch import PagedBatch
from model.config import BaseModelConfig
from model.layers.attention import (gather_context, masked_softmax, matmul_shared_context, pad_queries, unpad_queries,
                                    write_rows)
from model.layers.linear import Linear
from model.layers.moe import route_to_experts
from model.layers.rope import apply_rope, rope_cos_sin
from model.loading.state_dict import count_layers
from model.registry import FamilyRecord


@dataclass(frozen=True)
class ShomsherConfig(BaseModelConfig):
    """Defaults are the published run (`main.py`) plus the values its code hard-codes."""

    family: ClassVar[str] = "shomsher"
    vocab_size: int = 5515
    hidden_size: int = 200
    num_layers: int = 6
    num_heads: int = 8
    rope_dim: int = 24
    compressed_dim: int = 50
    num_experts: int = 4
    expert_hidden: int = 800
    top_k_experts: int = 1
    rope_divisor: float = 40.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    bias_qkv: bool = False
    max_context: int = 256
    bos_token_id: int | None = None
    eos_token_id: int | None = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            raise ValueError(f"rope_dim {self.rope_dim} must be even and at most the head dim {self.head_dim}")
        if not 1 <= self.top_k_experts <= self.num_experts:
            raise ValueError(f"top_k_experts {self.top_k_experts} must be between 1 and num_experts "
                             f"{self.num_experts}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def nope_dim(self) -> int:
        """Width of each head's W_uk / W_uq part (1 for the published model)."""
        return self.head_dim - self.rope_dim

    @property
    def cache_row_width(self) -> int:
        return self.compressed_dim


PRESETS = {
    "shomsher-llm": ShomsherConfig(),
    # same structure (head dim = rope_dim + 1), small
    "shomsher-tiny": ShomsherConfig(vocab_size=512, hidden_size=36, num_layers=2, num_heads=4, rope_dim=8,
                                    compressed_dim=12, num_experts=4, expert_hidden=48),
}


def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class ShomsherLayerNorm(nn.Module):
    """`scale · (x - mean) / sqrt(var + eps) + shift`, biased variance, in float32 below float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(_norm_dtype(x))
        mean = x32.mean(-1, keepdim=True)
        var = (x32 - mean).pow(2).mean(-1, keepdim=True)
        normed = ((x32 - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        return self.scale * normed + self.shift


class ShomsherRMSNorm(nn.Module):
    """`scale · x / sqrt(mean(x²) + eps)` (the seed's post-norm: `scale` only)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(_norm_dtype(x))
        return self.scale * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def derope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., H, head_dim]: rotate the first `rope_dim` (= cos.shape[-1]) dims, pass the rest.
    cos/sin [T, rope_dim] broadcast over x's position axis (the one before H)."""
    r = cos.shape[-1]
    return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)


class LatentAttention(nn.Module):
    """The seed's `mhattention`: compress to `c_kv` / `c_q`, expand per head, DeRoPE, causal softmax."""

    def __init__(self, cfg: ShomsherConfig):
        super().__init__()
        self.cfg = cfg
        d, c, heads, bias = cfg.hidden_size, cfg.compressed_dim, cfg.num_heads, cfg.bias_qkv
        self.W_dkv = Linear(d, c, bias=bias)
        self.W_dq = Linear(d, c, bias=bias)
        self.W_uk = Linear(c, heads * cfg.nope_dim, bias=bias)
        self.W_uv = Linear(c, heads * cfg.head_dim, bias=bias)
        self.W_uq = Linear(c, heads * cfg.nope_dim, bias=bias)
        self.W_qr = Linear(c, heads * cfg.rope_dim, bias=bias)
        self.W_kr = Linear(c, heads * cfg.rope_dim, bias=bias)
        self.output = Linear(d, d, bias=True)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def _heads(self, nope: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """[..., H*nope], [..., H*r] → per head [W_u* part | W_*r part]: [..., H, head_dim]."""
        heads = self.cfg.num_heads
        return torch.cat([nope.unflatten(-1, (heads, -1)), rope.unflatten(-1, (heads, -1))], dim=-1)

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., T, d] → post-DeRoPE q [..., T, H, head_dim]."""
        c_q = self.W_dq(x)
        return derope(self._heads(self.W_uq(c_q), self.W_qr(c_q)), cos, sin)

    def keys(self, c_kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """c_kv [..., T, C] → post-DeRoPE k [..., T, H, head_dim]."""
        return derope(self._heads(self.W_uk(c_kv), self.W_kr(c_kv)), cos, sin)

    def forward_full(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] → [B, T, d], causal, no cache, per-head K and V expanded."""
        seq = x.shape[1]
        c_kv = self.W_dkv(x)                                                       # [B, T, C]
        q = self.queries(x, cos, sin).transpose(1, 2)                              # [B, H, T, hd]
        k = self.keys(c_kv, cos, sin).transpose(1, 2)                              # [B, H, T, hd]
        v = self.W_uv(c_kv).unflatten(-1, (self.cfg.num_heads, -1)).transpose(1, 2)  # [B, H, T, hd]
        scores = (q @ k.transpose(-1, -2)).float() * self.scale                    # [B, H, T, T]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1).to(v.dtype)
        return self.output((attn @ v).transpose(1, 2).flatten(2))

    def forward_paged(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx_cos: torch.Tensor,
                      ctx_sin: torch.Tensor, batch: PagedBatch, cache_layer: torch.Tensor) -> torch.Tensor:
        """x [T, d] (flat tokens of many sequences) → [T, d] over paged `c_kv` rows.
        cos/sin [T, r] at the new tokens' positions; ctx_cos/ctx_sin [K, r] at key positions 0..K-1."""
        cfg = self.cfg
        heads, hd, latent = cfg.num_heads, cfg.head_dim, cfg.compressed_dim
        write_rows(cache_layer, batch, self.W_dkv(x))                              # [T, C]
        q = pad_queries(self.queries(x, cos, sin), batch).transpose(1, 2)          # [B, H, Q, hd]
        context = gather_context(cache_layer, batch).to(x.dtype)                  # [B, K, C]
        k = self.keys(context, ctx_cos, ctx_sin).permute(0, 2, 3, 1)              # [B, H, hd, K]
        attn = masked_softmax((q @ k) * self.scale, batch).to(x.dtype)            # [B, H, Q, K]
        out_latent = unpad_queries(matmul_shared_context(attn, context).transpose(1, 2), batch)  # [T, H, C]
        w_uv = self.W_uv.dense_weight().view(heads, hd, latent)                    # [H, hd, C]
        out = torch.einsum("thc,hvc->thv", out_latent, w_uv)                       # [T, H, hd]
        if self.W_uv.bias is not None:  # attention weights sum to 1, so the bias passes through
            out = out + self.W_uv.bias.view(heads, hd)
        return self.output(out.flatten(1))


class SwiGLU(nn.Module):
    """The seed's variant: `w3(w1(z) · silu(w2(z)))`, silu on w2, every Linear biased."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden)
        self.w2 = Linear(dim, hidden)
        self.w3 = Linear(hidden, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.w3(self.w1(z) * F.silu(self.w2(z)))


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ffn = nn.Sequential(Linear(dim, hidden), SwiGLU(hidden, hidden), Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)


class ShomsherMoE(nn.Module):
    """softmax(gate(x)) over the experts, top-k, renormalised (top-1: weight exactly 1)."""

    def __init__(self, cfg: ShomsherConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.expert_hidden) for _ in range(cfg.num_experts))
        self.gate = Linear(cfg.hidden_size, cfg.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] → [T, d]. Only experts that received tokens run."""
        probs = torch.softmax(self.gate(x).to(_norm_dtype(x)), dim=-1)           # [T, E]
        top_w, top_e = probs.topk(self.top_k, dim=-1)                             # [T, k]
        top_w = (top_w / top_w.sum(-1, keepdim=True)).to(x.dtype)
        return route_to_experts(x, top_w, top_e, self.experts)


class FeedForwardMoE(nn.Module):
    """Holds the MoE under the seed's `ff.moe.` key prefix."""

    def __init__(self, cfg: ShomsherConfig):
        super().__init__()
        self.moe = ShomsherMoE(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)


class ShomsherBlock(nn.Module):
    """Sandwich: `h + rmsnorm1(attn(ln1(h)))`, then `h + rmsnorm2(moe(ln2(h)))`."""

    def __init__(self, cfg: ShomsherConfig):
        super().__init__()
        self.mhattention = LatentAttention(cfg)
        self.ln1 = ShomsherLayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.ff = FeedForwardMoE(cfg)
        self.ln2 = ShomsherLayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.rmsnorm1 = ShomsherRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.rmsnorm2 = ShomsherRMSNorm(cfg.hidden_size, cfg.norm_eps)

    def moe_residual(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] → h + rmsnorm2(moe(ln2(h)))."""
        flat = self.ln2(h).reshape(-1, h.shape[-1])
        return h + self.rmsnorm2(self.ff(flat)).view_as(h)


class ShomsherLLMForCausalLM(nn.Module):
    def __init__(self, config: ShomsherConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.t_blocks = nn.ModuleList(ShomsherBlock(config) for _ in range(config.num_layers))
        self.final_ln = ShomsherLayerNorm(config.hidden_size, config.norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True)

    @staticmethod
    def is_ignored_checkpoint_key(key: str) -> bool:
        """The seed saves no buffers; its optimizer state sits beside `model_state_dict`, not in it."""
        return False

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        cfg = self.config
        return rope_cos_sin(positions, cfg.rope_dim, cfg.rope_theta, dtype, scale=1.0 / cfg.rope_divisor)

    def forward_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] → logits [B, T, V]; plain causal forward, no cache."""
        h = self.tok_emb(input_ids)                                                # [B, T, d]
        cos, sin = self._rope(torch.arange(input_ids.shape[1], device=input_ids.device), h.dtype)
        for block in self.t_blocks:
            h = h + block.rmsnorm1(block.mhattention.forward_full(block.ln1(h), cos, sin))
            h = block.moe_residual(h)
        return self.lm_head(self.final_ln(h))

    def forward_paged(self, batch: PagedBatch, cache: list[torch.Tensor]) -> torch.Tensor:
        """One step over the paged `c_kv` cache → logits [N, V] for batch.logits_index."""
        h = self.tok_emb(batch.token_ids)                                          # [T, d]
        cos, sin = self._rope(batch.positions, h.dtype)                            # [T, r]
        # no sliding window here, so PagedBatch lays every sequence's keys out from position 0
        key_positions = torch.arange(batch.context_slots.shape[1], device=h.device)
        ctx_cos, ctx_sin = self._rope(key_positions, h.dtype)                      # [K, r]
        for block, cache_layer in zip(self.t_blocks, cache):
            attn = block.mhattention.forward_paged(block.ln1(h), cos, sin, ctx_cos, ctx_sin, batch, cache_layer)
            h = h + block.rmsnorm1(attn)
            h = block.moe_residual(h)
        return self.lm_head(self.final_ln(h[batch.logits_index]))


def infer_shomsher_config(state: dict[str, torch.Tensor]) -> ShomsherConfig:
    """Dims from tensor shapes. The head count does not show in them (1, 2, 4 and 8 heads all fit
    the published shapes), so it comes from the `shomsher-llm` preset, whose dims must match."""
    vocab, hidden = state["tok_emb.weight"].shape
    moe = "t_blocks.0.ff.moe."
    dims = dict(vocab_size=vocab, hidden_size=hidden, num_layers=count_layers(state, "t_blocks."),
                compressed_dim=state["t_blocks.0.mhattention.W_dkv.weight"].shape[0],
                num_experts=state[moe + "gate.weight"].shape[0],
                expert_hidden=state[moe + "experts.0.ffn.0.weight"].shape[0])
    reference = PRESETS["shomsher-llm"]
    rope_rows = state["t_blocks.0.mhattention.W_kr.weight"].shape[0]
    if any(getattr(reference, k) != v for k, v in dims.items()) \
            or rope_rows != reference.num_heads * reference.rope_dim:
        raise ValueError("this ShomsherLLM checkpoint's shapes differ from the shomsher-llm preset and its "
                         "head count does not show in the weights; pass --preset NAME or a config.json")
    return reference.replace(bias_qkv="t_blocks.0.mhattention.W_dkv.bias" in state)


# no decode kernel: DeRoPE mixes W_uk into the rotated dims, so keys are re-expanded every step
FAMILY = FamilyRecord(
    name="shomsher", config_class=ShomsherConfig, model_class=ShomsherLLMForCausalLM, presets=PRESETS,
    markers=("t_blocks.0.mhattention.W_dkv.weight",), infer_config=infer_shomsher_config, decode_kernel=None)
