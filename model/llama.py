"""The Llama family (ARCHITECTURES.md §4): pre-norm decoder with grouped-query attention,
rotate_half RoPE, SwiGLU, final RMSNorm, optionally tied head. Serves the built-in SmolLM2.

Cache row per token and layer: `[K of every kv head, post-RoPE | V of every kv head]`.
Query head h reads kv head h // (num_heads / num_kv_heads) (contiguous groups).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import BaseModelConfig, register_family
from model.layers import RMSNorm, apply_rope, rope_cos_sin
from model.paged import PagedBatch, gather_context, masked_softmax, pad_queries, unpad_queries, write_rows


@dataclass(frozen=True)
class LlamaConfig(BaseModelConfig):
    family = "llama"
    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_context: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def cache_row_width(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim


register_family(LlamaConfig, {
    "smollm2-135m": LlamaConfig(),
    "llama-tiny": LlamaConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=16, intermediate_size=96, rope_theta=10000.0, max_context=256,
                              tie_word_embeddings=False, bos_token_id=None, eos_token_id=0),
})

_ROTARY_BUFFER = re.compile(r"rotary_emb\.inv_freq$")


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [T, d] → q [T, H, hd], k [T, KV, hd] (both post-RoPE), v [T, KV, hd]."""
        cfg = self.cfg
        q = apply_rope(self.q_proj(x).view(-1, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(-1, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = self.v_proj(x).view(-1, cfg.num_kv_heads, cfg.head_dim)
        return q, k, v

    def forward_full(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] → [B, T, d], causal, no cache."""
        cfg = self.cfg
        batch, seq, _ = x.shape
        q, k, v = self._qkv(x.flatten(0, 1), cos.repeat(batch, 1), sin.repeat(batch, 1))
        group = cfg.num_heads // cfg.num_kv_heads
        q = q.view(batch, seq, cfg.num_heads, -1).transpose(1, 2)                        # [B, H, T, hd]
        k = k.view(batch, seq, cfg.num_kv_heads, -1).transpose(1, 2).repeat_interleave(group, 1)
        v = v.view(batch, seq, cfg.num_kv_heads, -1).transpose(1, 2).repeat_interleave(group, 1)
        scores = (q @ k.transpose(-1, -2)).float() * self.scale                           # [B, H, T, T]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1).to(v.dtype)
        return self.o_proj((attn @ v).transpose(1, 2).reshape(batch, seq, -1))

    def forward_paged(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PagedBatch,
                      cache_layer: torch.Tensor) -> torch.Tensor:
        """x [T, d] → [T, d] over paged [K | V] rows."""
        cfg = self.cfg
        kv, hd = cfg.num_kv_heads, cfg.head_dim
        group = cfg.num_heads // kv
        q, k, v = self._qkv(x, cos, sin)
        write_rows(cache_layer, batch, torch.cat([k.flatten(1), v.flatten(1)], -1))    # [T, 2*KV*hd]
        context = gather_context(cache_layer, batch).to(x.dtype)                        # [B, K, 2*KV*hd]
        keys = context[..., : kv * hd].unflatten(-1, (kv, hd)).transpose(1, 2)          # [B, KV, K, hd]
        values = context[..., kv * hd:].unflatten(-1, (kv, hd)).transpose(1, 2)         # [B, KV, K, hd]
        qp = pad_queries(q, batch)                                                      # [B, Q, H, hd]
        num_seqs, max_q = qp.shape[:2]
        # query heads of one kv head side by side: [B, KV, group*Q, hd]
        qp = qp.view(num_seqs, max_q, kv, group, hd).permute(0, 2, 3, 1, 4).reshape(num_seqs, kv, group * max_q, hd)
        scores = (qp @ keys.transpose(-1, -2)) * self.scale                             # [B, KV, group*Q, K]
        scores = scores.view(num_seqs, kv * group, max_q, -1)                           # [B, H, Q, K]
        attn = masked_softmax(scores, batch).to(x.dtype)
        out = attn.view(num_seqs, kv, group * max_q, -1) @ values                      # [B, KV, group*Q, hd]
        out = out.view(num_seqs, kv, group, max_q, hd).permute(0, 3, 1, 2, 4)           # [B, Q, KV, group, hd]
        return self.o_proj(unpad_queries(out, batch).reshape(-1, cfg.num_heads * hd))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names follow Hugging Face's Llama (`model.layers.{i}.self_attn.q_proj.weight`, …)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @staticmethod
    def is_ignored_checkpoint_key(key: str) -> bool:
        return bool(_ROTARY_BUFFER.search(key)) or key == "lm_head.weight_tied"

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def forward_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] → logits [B, T, V]."""
        h = self.model.embed_tokens(input_ids)                                         # [B, T, d]
        cos, sin = self._rope(torch.arange(input_ids.shape[1], device=input_ids.device), h.dtype)
        for layer in self.model.layers:
            h = h + layer.self_attn.forward_full(layer.input_layernorm(h), cos, sin)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return F.linear(self.model.norm(h), self.head_weight())

    def forward_paged(self, batch: PagedBatch, cache: list[torch.Tensor]) -> torch.Tensor:
        """One step over the paged cache → logits [N, V] for batch.logits_index."""
        h = self.model.embed_tokens(batch.token_ids)                                   # [T, d]
        cos, sin = self._rope(batch.positions, h.dtype)
        for layer, cache_layer in zip(self.model.layers, cache):
            h = h + layer.self_attn.forward_paged(layer.input_layernorm(h), cos, sin, batch, cache_layer)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return F.linear(self.model.norm(h[batch.logits_index]), self.head_weight())
