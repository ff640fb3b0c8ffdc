"""The Llama family: pre-norm decoder with grouped-query attention, rotate_half RoPE over the whole
head, SwiGLU, final RMSNorm, optionally tied head. Serves the built-in SmolLM2-135M-Instruct. Its
config, presets and `FAMILY` record are here (GGUF files: model/loading/gguf_file.py).

Cache row per token and layer: `[K of every kv head, post-RoPE | V of every kv head]`.
Query head h reads kv head h // (num_heads / num_kv_heads) (contiguous groups), so the queries of
one kv head are reshaped side by side and attend to that head's K/V once; K/V are never repeated.
State-dict keys are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, …), so HF-style
state dicts load as they are; inside, q/k/v and gate/up are each one fused matmul.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.cache.batch import PagedBatch
from model.config import BaseModelConfig
from model.layers import prompt_ops
from model.layers.attention import (KernelAttention, gather_context, grouped_query_attention,
                                    paged_grouped_query_attention)
from model.layers.linear import Linear
from model.layers.norms import RMSNorm
from model.layers.quantized_linear import PREFILL_ROWS
from model.layers.rope import rope_cos_sin
from model.registry import FamilyRecord

# prompt steps' bfloat16 products run on their row count rounded up to this (`_prompt_layers_in_bfloat16`)
PROMPT_ROW_BUCKET = 32


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
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotate_half RoPE")

    @property
    def group_size(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def cache_row_width(self) -> int:
        # [K of every kv head, post-RoPE | V of every kv head]
        return 2 * self.num_kv_heads * self.head_dim


PRESETS = {
    "smollm2-135m": LlamaConfig(),
    "llama-tiny": LlamaConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=16, intermediate_size=96, rope_theta=10000.0, max_context=256,
                              tie_word_embeddings=False, bos_token_id=None, eos_token_id=0),
}

# saved rotary tables (`…rotary_emb.inv_freq`, HF's `model.rotary_emb.inv_freq`): recomputed, never loaded
_ROTARY_BUFFER = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


@dataclass
class Rope:
    """One step's rotation tables for the query and key heads side by side, shared by every layer:
    `[T, H + KV, hd]`. The query heads' rows carry the attention scale 1/sqrt(hd), so scores need no
    scaling of their own; `sin` holds rotate_half's sign: rope(x) = x·cos + swap_halves(x)·sin with
    sin = [-sin₁, sin₂]."""

    cos: torch.Tensor
    sin: torch.Tensor

    @staticmethod
    def build(positions: torch.Tensor, cfg: LlamaConfig, dtype: torch.dtype) -> "Rope":
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32)      # [T, hd]
        half = cfg.head_dim // 2
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)                             # [T, hd]
        scale = torch.full((cfg.num_heads + cfg.num_kv_heads, 1), 1.0, device=positions.device)
        scale[: cfg.num_heads] = 1.0 / math.sqrt(cfg.head_dim)                               # [H+KV, 1]
        return Rope((cos[:, None, :] * scale).to(dtype), (sin[:, None, :] * scale).to(dtype))


def _rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x [..., T, H+KV, hd] → rotate_half RoPE of every head (queries also scaled)."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)                           # [..., T, H+KV, hd]
    return torch.addcmul(x * rope.cos, swapped, rope.sin)


class FusedProjections(nn.Module):
    """Base for modules that run several same-input projections as one matmul (fewer, larger ops on
    the decode path) while their state dicts keep Hugging Face's separate names: `state_dict()` splits
    the fused weight into `{part}.weight` copies and `load_state_dict()` concatenates them back."""

    FUSED: dict[str, tuple[str, ...]] = {}   # fused linear name → the part names, in row order

    def __init__(self):
        super().__init__()
        self.register_state_dict_post_hook(_split_fused)
        self.register_load_state_dict_pre_hook(_join_fused)

    def part_sizes(self, fused: str) -> list[int]:
        raise NotImplementedError


def _split_fused(module: FusedProjections, state_dict, prefix: str, local_metadata) -> None:
    for fused, parts in module.FUSED.items():
        weight = state_dict.pop(prefix + fused + ".weight", None)
        if weight is None:
            continue
        for part, rows in zip(parts, weight.split(module.part_sizes(fused))):
            state_dict[prefix + part + ".weight"] = rows.clone()   # own storage: saved as a tensor of its own


def _join_fused(module: FusedProjections, state_dict, prefix: str, *args) -> None:
    for fused, parts in module.FUSED.items():
        keys = [prefix + part + ".weight" for part in parts]
        if all(key in state_dict for key in keys):
            state_dict[prefix + fused + ".weight"] = torch.cat([state_dict.pop(key) for key in keys])


def join_fused_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Replace, in place, every fused module's separate HF-named weights in `state` by the fused
    weight, one module at a time, so loading holds at most one module's weights twice."""
    for name, module in model.named_modules():
        if isinstance(module, FusedProjections):
            _join_fused(module, state, f"{name}." if name else "")


class LlamaAttention(KernelAttention, FusedProjections):
    """Decode-only steps may run in paged_gqa_decode (model/kernels), set by `use_decode_kernel`."""

    FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    HAS_PREFILL_DTYPE = True
    TILE_ATTENTION = True

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def part_sizes(self, fused: str) -> list[int]:
        cfg = self.cfg
        return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]

    def _qkv(self, x: torch.Tensor, rope: Rope):
        """x [..., T, d] → q [..., T, H, hd] (post-RoPE, pre-scaled), k [..., T, KV, hd] (post-RoPE),
        v [..., T, KV*hd]."""
        cfg = self.cfg
        heads = cfg.num_heads + cfg.num_kv_heads
        qkv = self.qkv_proj(x)                                                              # [..., T, (H+2KV)*hd]
        qk = _rotate(qkv[..., : heads * cfg.head_dim].unflatten(-1, (heads, cfg.head_dim)), rope)
        return qk[..., : cfg.num_heads, :], qk[..., cfg.num_heads:, :], qkv[..., heads * cfg.head_dim:]

    def forward_full(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x [B, T, d] → [B, T, d]: plain causal attention, K/V repeated per query head, no cache."""
        cfg = self.cfg
        batch, seq, _ = x.shape
        q, k, v = self._qkv(x, rope)
        q = q.transpose(1, 2)                                                               # [B, H, T, hd]
        k = k.transpose(1, 2)                                                               # [B, KV, T, hd]
        v = v.unflatten(-1, (cfg.num_kv_heads, cfg.head_dim)).transpose(1, 2)              # [B, KV, T, hd]
        k = k.repeat_interleave(cfg.group_size, dim=1)                                      # [B, H, T, hd]
        v = v.repeat_interleave(cfg.group_size, dim=1)                                      # [B, H, T, hd]
        scores = (q @ k.transpose(-1, -2)).float()                                          # [B, H, T, T]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).to(v.dtype)
        return self.o_proj((attn @ v).transpose(1, 2).reshape(batch, seq, -1))            # [B, T, d]

    def forward_paged(self, x: torch.Tensor, rope: Rope, batch: PagedBatch,
                      cache_layer: torch.Tensor) -> torch.Tensor:
        """x [T, d] → [T, d]: write this step's [K | V] rows, then attend over each sequence's context
        (q is pre-scaled: scale 1)."""
        if not batch.is_decode_only and self.takes_bfloat16_prompt(x.shape[0], cache_layer, rope):
            return self.prompt_in_bfloat16(x, rope, batch, cache_layer).to(x.dtype)
        q, k, v = self._qkv(x, rope)                                                        # [T, H|KV, hd], [T, KV*hd]
        out = paged_grouped_query_attention(q, k, v, batch, cache_layer, 1.0, self.decode_kernel,
                                            self.prefill_dtype)                                # [T, H*hd]
        return self.o_proj(out)

    def takes_bfloat16_prompt(self, rows: int, cache_layer: torch.Tensor, rope: Rope) -> bool:
        """Whether a prompt chunk of `rows` rows runs `prompt_in_bfloat16`: both products take bfloat16
        inputs at that many rows, attention runs in bfloat16, and the C kernels serve the cache."""
        bf16 = torch.bfloat16
        return (self.prefill_dtype == bf16 and self.qkv_proj.input_dtype(rows) == bf16
                and self.o_proj.input_dtype(rows) == bf16 and prompt_ops.rope_applies(cache_layer, rope.cos, rope.sin))

    def prompt_in_bfloat16(self, x: torch.Tensor, rope: Rope, batch: PagedBatch, cache_layer: torch.Tensor,
                           out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """A prompt chunk's attention where `takes_bfloat16_prompt`: x [T, d] → [T, d] bfloat16. q|k|v
        stays bfloat16 through RoPE, the cache write and the attention (one C pass,
        model/layers/prompt_ops.py); prompts from position 0 attend to their own keys without gathering
        them back from the cache, in the tile-unit kernel where `prompt_tile_attention`.
        `out_rows` [N]: every row's keys and values are cached, but only these rows' output is made,
        as float32 [N, d] (none: no attention at all). x may carry padding rows after the step's
        tokens (`PROMPT_ROW_BUCKET`): they go through the products only, their attention output zero."""
        cfg = self.cfg
        bf16 = torch.bfloat16
        tokens = rope.cos.shape[0]              # the step's T tokens: x may end in padding rows (Tp ≥ T)
        qkv = self.qkv_proj(x.to(bf16))                                                     # [Tp, (H+2KV)*hd] bf16
        # q [T, H, hd]; kv [T, 2*KV*hd] where every chunk is a prompt from position 0 (its own keys), else None
        q, kv = prompt_ops.rope_qkv(qkv[:tokens], rope.cos, rope.sin, batch.slot_mapping, cache_layer,
                                    cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                    with_kv=batch.prompt_starts is not None)
        if out_rows is not None and not out_rows.numel():
            return x.new_zeros(0, x.shape[1], dtype=torch.float32)
        out = None
        if kv is not None and self.prompt_tile_attention:
            out = self._own_keys_attention(q, kv, batch, cache_layer)                       # [T, H, hd]
        if out is None:
            if kv is None or not batch.plain_causal:
                kv = gather_context(cache_layer, batch).to(bf16)                            # [B, K, 2*KV*hd]
            else:
                kv = kv[None]                                                               # [1, T, 2*KV*hd]
            width = cfg.num_kv_heads * cfg.head_dim
            keys = kv[..., :width].unflatten(-1, (cfg.num_kv_heads, cfg.head_dim)).transpose(1, 2)   # [B, KV, K, hd]
            values = kv[..., width:].unflatten(-1, (cfg.num_kv_heads, cfg.head_dim)).transpose(1, 2)  # [B, KV, K, hd]
            out = grouped_query_attention(q, keys, values, batch, 1.0)                      # [T, H, hd] bf16
        out = out.reshape(tokens, -1)                                                       # [T, H*hd] bf16
        if out_rows is None:
            if x.shape[0] > tokens:                                                         # zero padding rows
                out = torch.cat([out, out.new_zeros(x.shape[0] - tokens, out.shape[1])])    # [Tp, H*hd]
            return self.o_proj(out)                                                         # [Tp, d] bf16
        return self.o_proj(out[out_rows].float())                                           # [N, d] float32


    def _own_keys_attention(self, q: torch.Tensor, kv: torch.Tensor, batch: PagedBatch,
                            cache_layer: torch.Tensor) -> torch.Tensor | None:
        """Attention of a step whose prompts all start at position 0 (batch.prompt_starts), q [T, H, hd]
        and kv [T, 2·KV·hd] bfloat16 → [T, H, hd] bfloat16: the prompts over their own keys in the
        tile kernel; the one-token chunks before them (batch.leading_decodes: running sequences'
        decodes in the same step) in the decode kernel, over the cache where it sits. None where a
        kernel does not run (the caller gathers the context instead)."""
        cfg, decodes = self.cfg, batch.leading_decodes
        if decodes == 0:
            return prompt_ops.causal_attention(q, kv, cfg.num_kv_heads, starts=batch.prompt_starts)
        if self.decode_kernel is None:
            return None
        prompts = prompt_ops.causal_attention(q[decodes:], kv[decodes:], cfg.num_kv_heads,
                                              starts=batch.prompt_starts)                    # [T - D, H, hd]
        if prompts is None:
            return None
        tokens = self.decode_kernel(q[:decodes], cache_layer, batch.block_tables[:decodes],
                                    batch.context_lens[:decodes], batch.block_size, cfg.num_kv_heads, 1.0,
                                    batch.window)                                            # [D, H, hd] float32
        return torch.cat([tokens.to(prompts.dtype), prompts])                               # [T, H, hd]


class LlamaMLP(FusedProjections):
    """SwiGLU: down(silu(gate(x)) · up(x)), gate and up as one matmul."""

    FUSED = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def part_sizes(self, fused: str) -> list[int]:
        return [self.intermediate_size, self.intermediate_size]

    def sixteen_bit_dtype(self, rows: int) -> torch.dtype | None:
        """The 16-bit dtype both products compute on at this many rows (bfloat16 copies for prompt
        chunks), or None."""
        dtype = self.gate_up_proj.input_dtype(rows)
        return dtype if dtype is not None and self.down_proj.input_dtype(rows) == dtype else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] → [..., d] in x's dtype. Where both products take 16-bit inputs at this many rows,
        the [..., 2I] intermediate stays 16-bit: no float32 copy of it made and converted back, half
        the bytes through SwiGLU (one C pass for bfloat16, model/layers/prompt_ops.py)."""
        dtype = self.sixteen_bit_dtype(x.numel() // x.shape[-1])
        if dtype is not None:
            gate_up = self.gate_up_proj(x.to(dtype))                                        # [..., 2I] dtype
            act = prompt_ops.swiglu(gate_up)                                                # [..., I] or None
            if act is None:
                gate, up = gate_up.chunk(2, dim=-1)
                act = F.silu(gate) * up
            return self.down_proj(act).to(x.dtype)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)                                   # [..., I] each
        return self.down_proj(F.silu(gate) * up)


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
    """`forward_full` (plain causal, the reference form) and `forward_paged` (flat batch over the
    paged [K | V] cache, the serving form). With a tied head there is no `lm_head` parameter: the
    head is `model.embed_tokens.weight`. `cpu_decode_step` (model/families/llama_cpu_step.py), when
    set, runs the layers of a decode step on the CPU in one C call."""

    cpu_decode_step = None

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @staticmethod
    def is_ignored_checkpoint_key(key: str) -> bool:
        return bool(_ROTARY_BUFFER.search(key))

    def head_weight(self) -> torch.Tensor:
        return self.lm_head.dense_weight() if "lm_head" in self._modules else self.model.embed_tokens.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] (normed) → [..., V]: through `lm_head` when there is one (an untied head, or a
        quantized copy of the tied one: model/layers/quantized_linear.py), else the embedding table."""
        if "lm_head" in self._modules:
            return self.lm_head(h)
        return F.linear(h, self.model.embed_tokens.weight)

    def forward_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] → logits [B, T, V]."""
        h = self.model.embed_tokens(input_ids)                                              # [B, T, d]
        rope = Rope.build(torch.arange(input_ids.shape[1], device=input_ids.device), self.config, h.dtype)
        for layer in self.model.layers:
            h = h + layer.self_attn.forward_full(layer.input_layernorm(h), rope)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.logits(self.model.norm(h))                                              # [B, T, V]

    def _prompt_layers_in_bfloat16(self, h: torch.Tensor, rope: Rope, batch: PagedBatch,
                                   cache: list[torch.Tensor]) -> torch.Tensor | None:
        """A step with prompt chunks through layers whose products and attention all take bfloat16
        for its rows: the activations between the products stay bfloat16, each residual add and the
        norm after it one C pass (model/layers/prompt_ops.py); h [T, d] float32, the residual stream, is
        updated in place up to the last layer. Returns the last layer's output at batch.logits_index
        [N, d] float32: that layer's keys and values go to the cache for every row, but its attention
        output, o product and MLP go on for those rows only (the others' would feed nothing). None (h
        untouched) where this does not apply.
        Past PREFILL_ROWS the products run on the row count rounded up to PROMPT_ROW_BUCKET (zero rows
        after the tokens, rows of their own that nothing reads: their attention output is zero and
        every other operation is row by row; h is then a padded copy): oneDNN compiles a kernel for
        every new row count of a bfloat16 product, 2.5-5 ms a shape, so a prompt of a length not seen
        before took 10-16 ms longer (docs/benchmarks.md, "oneDNN compiles a new kernel")."""
        layers, rows = self.model.layers, h.shape[0]
        if batch.is_decode_only or not layers or not all(
                layer.self_attn.takes_bfloat16_prompt(rows, cache_layer, rope)
                and layer.mlp.sixteen_bit_dtype(rows) == torch.bfloat16
                for layer, cache_layer in zip(layers, cache)):
            return None
        if rows > PREFILL_ROWS and rows % PROMPT_ROW_BUCKET:    # the products' row count rounded up
            h = torch.cat([h, h.new_zeros(PROMPT_ROW_BUCKET - rows % PROMPT_ROW_BUCKET, h.shape[1])])   # [Tp, d]
        normed = layers[0].input_layernorm(h).to(torch.bfloat16)                            # [Tp, d] bf16
        for layer, following, cache_layer in zip(layers[:-1], layers[1:], cache[:-1]):
            attention = layer.self_attn.prompt_in_bfloat16(normed, rope, batch, cache_layer)  # [T, d] bf16
            post = layer.post_attention_layernorm
            normed = prompt_ops.add_rms_norm(h, attention, post.weight, post.eps)
            norm = following.input_layernorm
            normed = prompt_ops.add_rms_norm(h, layer.mlp(normed), norm.weight, norm.eps)
        last, rows = layers[-1], batch.logits_index
        out = h[rows] + last.self_attn.prompt_in_bfloat16(normed, rope, batch, cache[-1], out_rows=rows)  # [N, d]
        if rows.numel():
            out = out + last.mlp(last.post_attention_layernorm(out))
        return out

    def forward_paged(self, batch: PagedBatch, cache: list[torch.Tensor]) -> torch.Tensor:
        """One step over the paged cache (one [S, 2*KV*hd] tensor per layer) → logits [N, V] for
        batch.logits_index."""
        h = self.model.embed_tokens(batch.token_ids)                                        # [T, d]
        rope = Rope.build(batch.positions, self.config, h.dtype)
        if self.cpu_decode_step is not None and self.cpu_decode_step.run(h, rope.cos, rope.sin, batch, cache):
            return self.logits(self.model.norm(h[batch.logits_index]))                     # [N, V]
        out = self._prompt_layers_in_bfloat16(h, rope, batch, cache)                       # [N, d] or None
        if out is None:
            for layer, cache_layer in zip(self.model.layers, cache):
                h = h + layer.self_attn.forward_paged(layer.input_layernorm(h), rope, batch, cache_layer)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            out = h[batch.logits_index]
        return self.logits(self.model.norm(out))                                            # [N, V]


FAMILY = FamilyRecord(
    name="llama", config_class=LlamaConfig, model_class=LlamaForCausalLM, presets=PRESETS,
    markers=("model.layers.0.self_attn.q_proj.weight",), decode_kernel="paged_gqa_decode")
