"""CustomLLM-973M: multi-head latent attention (MLA) over a compressed latent, and a DeepSeek-style
MoE (shared experts plus sigmoid-routed experts). Its config, presets and `FAMILY` record are here.

Module and parameter names are the seed's, so its state dicts load with strict key checks.
Attention has two forms:
- naive (`forward_full`): expands per-head K and V from the latent; the reference form;
- absorbed (`forward_paged`): caches only `[c_kv | post-RoPE k_rope of every head]` (576 values per
  token per layer for the 973M model) and folds `k_proj_u` into the query and `v_proj_u` into the
  output, so cached tokens are never re-expanded.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from model.cache.batch import PagedBatch
from model.config import BaseModelConfig
from model.layers.attention import (KernelAttention, gather_context, grouped_query_attention, masked_softmax,
                                    matmul_shared_context, write_rows)
from model.layers.linear import FusableProjections, Linear
from model.layers.moe import RoutedExperts, SwiGLUExpert
from model.layers.norms import RMSNorm
from model.layers.rope import apply_rope, rope_cos_sin
from model.loading.state_dict import CheckpointError, count_layers
from model.registry import FamilyRecord


@dataclass(frozen=True)
class CustomLLMConfig(BaseModelConfig):
    """CustomLLM-973M's dims by default: MLA with a 192-wide latent, 1 shared + 7 routed experts."""

    family: ClassVar[str] = "custom_llm"
    vocab_size: int = 49152
    hidden_size: int = 768
    num_layers: int = 30
    num_heads: int = 12
    head_dim: int = 64
    max_context: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    latent_dim: int = 192
    rope_dim: int = 32
    num_shared_experts: int = 1
    num_routed_experts: int = 7
    expert_hidden: int = 1536
    top_k_experts: int = 2
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def cache_row_width(self) -> int:
        # [c_kv | post-RoPE k_rope of every head]
        return self.latent_dim + self.num_heads * self.rope_dim


PRESETS = {
    "custom-llm-973m": CustomLLMConfig(),
    "custom-llm-tiny": CustomLLMConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, max_context=256,
        latent_dim=16, rope_dim=8, num_shared_experts=1, num_routed_experts=7, expert_hidden=32,
        top_k_experts=2,
    ),
}

_ROTARY_BUFFER = re.compile(r"\.rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


class MultiHeadLatentAttention(KernelAttention, FusableProjections, nn.Module):
    """Decode-only steps may run in paged_mla_decode (model/kernels), set by `use_decode_kernel`.
    Quantized, the projections of x (kv_proj_d, q_proj_d, rope_k) and those of c_q (q_proj_u, rope_q)
    may each run as one product (FUSABLE)."""

    FUSABLE = {"input_proj": ("kv_proj_d", "q_proj_d", "rope_k"), "query_proj": ("q_proj_u", "rope_q")}

    def __init__(self, cfg: CustomLLMConfig):
        super().__init__()
        self.cfg = cfg
        d, latent, heads = cfg.hidden_size, cfg.latent_dim, cfg.num_heads
        self.kv_proj_d = Linear(d, latent, bias=False)
        self.q_proj_d = Linear(d, latent, bias=False)
        self.k_proj_u = Linear(latent, heads * cfg.nope_dim, bias=False)
        self.q_proj_u = Linear(latent, heads * cfg.nope_dim, bias=False)
        self.v_proj_u = Linear(latent, heads * cfg.head_dim, bias=False)
        self.rope_q = Linear(latent, heads * cfg.rope_dim, bias=False)
        self.rope_k = Linear(d, heads * cfg.rope_dim, bias=False)
        self.o_proj = Linear(heads * cfg.head_dim, d, bias=False)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def _projections(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [T, d] → c_kv [T, latent], q_nope [T, H, nope], post-RoPE q_rope and k_rope [T, H, r]."""
        heads, nope, r = self.cfg.num_heads, self.cfg.nope_dim, self.cfg.rope_dim
        c_kv, c_q, k_rope = self.project("input_proj", x)                     # [T, latent], [T, latent], [T, H*r]
        q_nope, q_rope = self.project("query_proj", c_q)                      # [T, H*nope], [T, H*r]
        q_rope = apply_rope(q_rope.unflatten(-1, (heads, r)), cos, sin)
        k_rope = apply_rope(k_rope.unflatten(-1, (heads, r)), cos, sin)
        return c_kv, q_nope.unflatten(-1, (heads, nope)), q_rope, k_rope

    def forward_naive(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] → [B, T, d]; causal attention with per-head K and V expanded."""
        cfg = self.cfg
        batch, seq, _ = x.shape
        heads, nope, hd = cfg.num_heads, cfg.nope_dim, cfg.head_dim
        flat = x.reshape(batch * seq, -1)
        cos_bt, sin_bt = cos.repeat(batch, 1), sin.repeat(batch, 1)
        c_kv, q_nope, q_rope, k_rope = self._projections(flat, cos_bt, sin_bt)  # [BT, latent], [BT, H, *]
        q = torch.cat([q_nope, q_rope], -1)                                     # [BT, H, hd]
        k = torch.cat([self.k_proj_u(c_kv).view(-1, heads, nope), k_rope], -1)
        v = self.v_proj_u(c_kv).view(-1, heads, hd)
        q, k, v = (t.view(batch, seq, heads, hd).transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        scores = (q @ k.transpose(-1, -2)).float() * self.scale                 # [B, H, T, T]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1).to(v.dtype)
        out = (attn @ v).transpose(1, 2).reshape(batch, seq, heads * hd)
        return self.o_proj(out)

    def forward_absorbed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         batch: PagedBatch, cache_layer: torch.Tensor) -> torch.Tensor:
        """x [T, d] (flat tokens of many sequences) → [T, d], reading/writing 576-wide latent rows.
        Decode steps attend in latent space (queries absorbed through W_uk, outputs through W_uv);
        steps with prefill chunks expand the context's keys and values per head instead, which
        costs far fewer FLOPs when many queries share a context."""
        cfg = self.cfg
        heads, nope, latent, r = cfg.num_heads, cfg.nope_dim, cfg.latent_dim, cfg.rope_dim
        c_kv, q_nope, q_rope, k_rope = self._projections(x, cos, sin)            # [T, latent], [T, H, nope|r]
        write_rows(cache_layer, batch, torch.cat([c_kv, k_rope.flatten(1)], -1))  # [T, latent + H*r]
        if not batch.is_decode_only:
            return self._expanded_attention(q_nope, q_rope, batch, cache_layer)

        w_uk = self.k_proj_u.dense_weight().view(heads, nope, latent)            # [H, nope, latent]
        q_latent = torch.einsum("thn,hnl->thl", q_nope, w_uk)                    # [T, H, latent]
        if self.decode_kernel is not None:
            # one token per sequence, in sequence order: T = B
            out_latent = self.decode_kernel(q_latent, q_rope, cache_layer, batch.block_tables,
                                               batch.context_lens, batch.block_size, self.scale,
                                               batch.window).to(x.dtype)          # [B, H, latent]
            return self._output(out_latent)

        context = gather_context(cache_layer, batch).to(x.dtype)                 # [B, K, latent + H*r]
        ctx_latent = context[..., :latent]                                       # [B, K, latent]
        ctx_rope = context[..., latent:].unflatten(-1, (heads, r)).transpose(1, 2)  # [B, H, K, r]
        # one query per sequence, in sequence order (T = B): the latent rows are read once for all heads
        scores = (matmul_shared_context(q_latent[:, :, None], ctx_latent.transpose(1, 2))  # [B, H, 1, K]
                  + q_rope[:, :, None] @ ctx_rope.transpose(-1, -2)) * self.scale
        attn = masked_softmax(scores, batch).to(x.dtype)                         # [B, H, 1, K]
        out_latent = matmul_shared_context(attn, ctx_latent)                     # [B, H, 1, latent]
        return self._output(out_latent[:, :, 0])                                 # [T, H, latent]

    def _expanded_attention(self, q_nope: torch.Tensor, q_rope: torch.Tensor, batch: PagedBatch,
                            cache_layer: torch.Tensor) -> torch.Tensor:
        """Steps with prefill chunks: each context row's keys [W_uk c | k_rope] and values W_uv c per
        head, then PyTorch's fused attention (no [Q, K] score matrix) → [T, d]."""
        cfg = self.cfg
        heads, nope, latent, hd, r = cfg.num_heads, cfg.nope_dim, cfg.latent_dim, cfg.head_dim, cfg.rope_dim
        context = gather_context(cache_layer, batch).to(q_nope.dtype)           # [B, K, latent + H*r]
        ctx_latent = context[..., :latent]                                       # [B, K, latent]
        k_nope = self.k_proj_u(ctx_latent).unflatten(-1, (heads, nope))          # [B, K, H, nope]
        k_rope = context[..., latent:].unflatten(-1, (heads, r))                 # [B, K, H, r]
        keys = torch.cat([k_nope, k_rope], -1).transpose(1, 2)                   # [B, H, K, hd]
        values = self.v_proj_u(ctx_latent).unflatten(-1, (heads, hd)).transpose(1, 2)  # [B, H, K, hd]
        queries = torch.cat([q_nope, q_rope], -1)                                # [T, H, hd]
        out = grouped_query_attention(queries, keys, values, batch, self.scale)  # [T, H, hd]
        return self.o_proj(out.flatten(1))

    def _output(self, out_latent: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space [T, H, latent] → [T, d] (W_uv, then o_proj)."""
        cfg = self.cfg
        w_uv = self.v_proj_u.dense_weight().view(cfg.num_heads, cfg.head_dim, cfg.latent_dim)  # [H, hd, latent]
        out = torch.einsum("thl,hvl->thv", out_latent, w_uv)                     # [T, H, hd]
        return self.o_proj(out.flatten(1))


class DeepSeekMoE(RoutedExperts, nn.Module):
    """Shared experts always; routed experts by sigmoid(router + routing_bias), top-k renormalised."""

    def __init__(self, cfg: CustomLLMConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.shared_experts = nn.ModuleList(
            SwiGLUExpert(cfg.hidden_size, cfg.expert_hidden) for _ in range(cfg.num_shared_experts))
        self.routed_experts = nn.ModuleList(
            SwiGLUExpert(cfg.hidden_size, cfg.expert_hidden) for _ in range(cfg.num_routed_experts))
        self.router = Linear(cfg.hidden_size, cfg.num_routed_experts, bias=False)
        self.routing_bias = nn.Parameter(torch.zeros(cfg.num_routed_experts))
        self.init_routing()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] → [T, d] (routing: see RoutedExperts). Quantized experts take their activations
        in the dtype of their kernels, converted once here for all of them."""
        experts_x = x.to(self.shared_experts[0].down_proj.input_dtype(x.shape[0]) or x.dtype)   # [T, d]
        out = self.shared_experts[0](experts_x).to(x.dtype)
        for expert in self.shared_experts[1:]:
            out = out + expert(experts_x).to(x.dtype)
        if len(self.shared_experts) > 1:
            out = out / len(self.shared_experts)
        scores = torch.sigmoid(self.router(x).float() + self.routing_bias.float())   # [T, E]
        top_w, top_e = scores.topk(self.top_k, dim=-1)                               # [T, k]
        top_w = (top_w / top_w.sum(-1, keepdim=True)).to(x.dtype)
        return out + self.routed(experts_x, top_w, top_e)


class MoEBlock(nn.Module):
    """Holds the MoE under the seed's `mlp.moe.` key prefix."""

    def __init__(self, cfg: CustomLLMConfig):
        super().__init__()
        self.moe = DeepSeekMoE(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: CustomLLMConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoEBlock(cfg)


class CustomLLMForCausalLM(nn.Module):
    """`cpu_decode_step` (model/families/custom_llm_cpu_step.py), when set, runs the layers of a
    decode step on the CPU in one C call."""

    cpu_decode_step = None

    def __init__(self, config: CustomLLMConfig):
        super().__init__()
        self.config = config
        self.token_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_context, config.hidden_size)
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True)

    @staticmethod
    def is_ignored_checkpoint_key(key: str) -> bool:
        return bool(_ROTARY_BUFFER.search(key))

    def _check_positions(self, max_position: int) -> None:
        if max_position >= self.config.max_context:
            raise ValueError(f"position {max_position} is past the context limit "
                             f"{self.config.max_context} of the position table")

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.token_embeddings(input_ids) + self.position_embeddings(positions)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(positions, self.config.rope_dim, self.config.rope_theta, dtype)

    def forward_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] → logits [B, T, V] with naive attention, no cache."""
        seq = input_ids.shape[1]
        self._check_positions(seq - 1)
        positions = torch.arange(seq, device=input_ids.device)
        h = self._embed(input_ids, positions[None, :].expand_as(input_ids))   # [B, T, d]
        cos, sin = self._rope(positions, h.dtype)                             # [T, r]
        for layer in self.decoder_layers:
            h = h + layer.self_attn.forward_naive(layer.input_norm(h), cos, sin)
            flat = layer.post_attn_norm(h).flatten(0, 1)
            h = h + layer.mlp(flat).view_as(h)
        return self.lm_head(h)

    def forward_paged(self, batch: PagedBatch, cache: list[torch.Tensor]) -> torch.Tensor:
        """One step over the paged latent cache → logits [N, V] for batch.logits_index.
        No host syncs when the decode attention is a kernel and the MoE routes sync-free."""
        self._check_positions(batch.max_position)
        h = self._embed(batch.token_ids, batch.positions)                     # [T, d]
        cos, sin = self._rope(batch.positions, h.dtype)                       # [T, r]
        if self.cpu_decode_step is None or not self.cpu_decode_step.run(h, cos, sin, batch, cache):
            for layer, cache_layer in zip(self.decoder_layers, cache):
                h = h + layer.self_attn.forward_absorbed(layer.input_norm(h), cos, sin, batch, cache_layer)
                h = h + layer.mlp(layer.post_attn_norm(h))
        return self.lm_head(h[batch.logits_index])


# ---- checkpoints ----------------------------------------------------------------------------------
LATER_LAYOUT_KEY = "decoder_layers.0.mlp.shared_experts.0.gate_proj.weight"


def refuse_later_layout(state: dict[str, torch.Tensor]) -> None:
    """The later Assign15 code saved MoE keys without `.moe` and changed what they mean."""
    if LATER_LAYOUT_KEY in state:
        raise CheckpointError(
            "this checkpoint has the later Assign15 layout (MoE keys without `.moe`, e.g. "
            f"{LATER_LAYOUT_KEY}): that code changed the semantics (9 heads, softmax routing) and "
            "cannot be served as CustomLLM-973M; export the documented layout (decoder_layers.{i}.mlp.moe.…)")


def infer_custom_llm_config(state: dict[str, torch.Tensor]) -> CustomLLMConfig:
    """CustomLLM dims from tensor shapes; heads from the saved rotary buffers (inv_freq [r/2]),
    which is the only place the head count shows."""
    vocab, hidden = state["token_embeddings.weight"].shape
    moe = "decoder_layers.0.mlp.moe."
    shared = sum(1 for k in state if k.startswith(moe + "shared_experts.") and k.endswith("gate_proj.weight"))
    routed = sum(1 for k in state if k.startswith(moe + "routed_experts.") and k.endswith("gate_proj.weight"))
    dims = dict(vocab_size=vocab, hidden_size=hidden, num_layers=count_layers(state, "decoder_layers."),
                max_context=state["position_embeddings.weight"].shape[0],
                latent_dim=state["decoder_layers.0.self_attn.kv_proj_d.weight"].shape[0],
                num_shared_experts=shared, num_routed_experts=routed,
                expert_hidden=state[moe + "routed_experts.0.gate_proj.weight"].shape[0])
    inv_freq = state.get("decoder_layers.0.self_attn.rotary_emb.inv_freq")
    rope_width = state["decoder_layers.0.self_attn.rope_k.weight"].shape[0]   # heads * rope_dim
    if inv_freq is not None:
        rope_dim = 2 * inv_freq.shape[0]
        heads = rope_width // rope_dim
        return CustomLLMConfig(**dims, num_heads=heads, head_dim=2 * rope_dim, rope_dim=rope_dim)
    reference = PRESETS["custom-llm-973m"]
    if all(getattr(reference, k) == v for k, v in dims.items()):
        return reference
    raise CheckpointError("this CustomLLM checkpoint's shapes differ from custom-llm-973m and it carries no "
                          "rotary buffers to read the head count from; pass --preset NAME or a config.json")


def custom_llm_warnings(state: dict[str, torch.Tensor]) -> list[str]:
    biases = [v for k, v in state.items() if k.endswith("routing_bias")]
    norms = [v for k, v in state.items() if k.endswith(("input_norm.weight", "post_attn_norm.weight"))]
    if biases and all(bool((b == 0).all()) for b in biases) and all(bool((n == 1).all()) for n in norms):
        return ["every decoder layer is at its initial values (routing_bias 0, norm weights 1): this looks "
                "like a checkpoint from the seed's training code, whose forward skipped the decoder layers; "
                "its outputs will not be what training saw"]
    return []


FAMILY = FamilyRecord(
    name="custom_llm", config_class=CustomLLMConfig, model_class=CustomLLMForCausalLM, presets=PRESETS,
    markers=("decoder_layers.0.self_attn.kv_proj_d.weight",), infer_config=infer_custom_llm_config,
    check_checkpoint=refuse_later_layout, warnings=custom_llm_warnings, decode_kernel="paged_mla_decode")
