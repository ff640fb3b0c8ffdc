"""SmartLLM / Custom_LLM: pre-norm GQA transformer with sliding-window attention, ReZero residual
scales, SwiGLU or a shared + routed softmax top-k MoE, and a head tied to the embedding. Its config,
presets and `FAMILY` record are here.

Module and parameter names are the seed's (`layers.{i}.attention.wq.weight`, …). Cache row per token
and layer: `[K of every kv head, post-RoPE | V of every kv head]`; query head h reads kv head
h // (n_heads / n_kv_heads). With the window on, a query at p sees keys p-W … p: the runner passes
`config.sliding_window` to `PagedBatch.build`, whose mask `forward_paged` uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from model.cache.batch import PagedBatch
from model.config import BaseModelConfig
from model.layers.attention import KernelAttention, paged_grouped_query_attention
from model.layers.linear import Linear
from model.layers.moe import RoutedExperts
from model.layers.norms import RMSNorm
from model.layers.rope import apply_rope, rope_cos_sin
from model.loading.state_dict import count_layers
from model.registry import FamilyRecord

# the seed's ModelConfig names → ours (the others are the same)
SEED_ALIASES = {"d_model": "hidden_size", "n_layers": "num_layers", "max_seq_len": "max_context"}
# ModelConfig fields that only matter in training (or that the seed's model never reads)
SEED_TRAINING_FIELDS = frozenset({
    "dropout", "use_rotary_embeddings", "load_balancing_weight", "router_z_loss_weight", "use_flash_attention",
    "layer_drop_prob", "use_gradient_checkpointing"})


@dataclass(frozen=True)
class SmartLLMConfig(BaseModelConfig):
    """Field names are the seed's `ModelConfig` names, except the common ones (`d_model` is
    `hidden_size`, `n_layers` is `num_layers`, `max_seq_len` is `max_context`; both spellings read).
    Defaults are the published run (vocab 16000, BPE)."""

    family: ClassVar[str] = "smart_llm"
    vocab_size: int = 16000
    hidden_size: int = 512
    num_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    d_ff: int = 1024
    max_context: int = 1024
    use_mixture_of_experts: bool = True
    num_experts: int = 4
    num_experts_per_token: int = 2
    sliding_window_size: int = 128
    use_sliding_window_attention: bool = True
    use_rezero: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 2
    eos_token_id: int | None = 3

    def __post_init__(self):
        if self.hidden_size % self.n_heads:
            raise ValueError(f"d_model {self.hidden_size} is not a multiple of n_heads {self.n_heads}")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"the head dim {self.head_dim} must be even for RoPE")
        if self.use_sliding_window_attention and self.sliding_window_size < 1:
            raise ValueError(f"sliding_window_size {self.sliding_window_size} must be at least 1")
        if self.use_mixture_of_experts and not 1 <= self.num_experts_per_token <= self.num_experts:
            raise ValueError(f"num_experts_per_token {self.num_experts_per_token} must be between 1 and "
                             f"num_experts {self.num_experts}")

    # seed spellings, read-only
    d_model = property(lambda self: self.hidden_size)
    n_layers = property(lambda self: self.num_layers)
    max_seq_len = property(lambda self: self.max_context)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def sliding_window(self) -> int | None:
        """W when the window is on (a query at p sees keys p-W … p), else None."""
        return self.sliding_window_size if self.use_sliding_window_attention else None

    @property
    def cache_row_width(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SmartLLMConfig":
        """Our field names or the seed's (`d_model`, `n_layers`, `max_seq_len`; training-only fields
        ignored). A seed name given beside ours wins: only user data carries seed names."""
        data = {k: v for k, v in data.items() if k not in SEED_TRAINING_FIELDS}
        for seed_name, ours in SEED_ALIASES.items():
            if seed_name in data:
                data[ours] = data.pop(seed_name)
        return super().from_dict(data)

    @classmethod
    def from_seed_config(cls, data: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> "SmartLLMConfig":
        """From the seed's `ModelConfig` fields (the pickled object's dict, or a config.json with the
        same names). With a state dict, the vocab is the embedding's row count and values the shapes
        show fill what the dict lacks. Values that nothing shows (heads, window, experts per token)
        must be given: one ValueError names every missing one."""
        data = {SEED_ALIASES.get(k, k): v for k, v in data.items() if k not in SEED_TRAINING_FIELDS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in known and k not in ("family", "preset"))
        if unknown:
            raise ValueError(f"SmartLLM config: unknown field(s) {unknown}")
        values = {k: v for k, v in data.items() if k in known}
        if state is not None:
            for key, value in _shape_values(state).items():
                if key == "vocab_size" or key not in values:
                    values[key] = value
        values.setdefault("use_sliding_window_attention", True)   # the seed's default
        values.setdefault("max_context", 1024)                     # the seed's default; a serving limit only
        if "n_kv_heads" not in values and state is not None and "n_heads" in values and "hidden_size" in values:
            head_dim = values["hidden_size"] // values["n_heads"]
            values["n_kv_heads"] = state["layers.0.attention.wk.weight"].shape[0] // head_dim
        needed = ["vocab_size", "hidden_size", "num_layers", "n_heads", "n_kv_heads", "d_ff",
                  "use_mixture_of_experts", "use_rezero"]
        if values.get("use_mixture_of_experts"):
            needed += ["num_experts", "num_experts_per_token"]
        if values.get("use_sliding_window_attention"):
            needed.append("sliding_window_size")
        missing = [k for k in needed if k not in values]
        if missing:
            seed_names = {ours: seed for seed, ours in SEED_ALIASES.items()}
            raise ValueError("the SmartLLM config does not give " + ", ".join(seed_names.get(k, k) for k in missing)
                             + " (the weights do not show them); put them in a config.json beside the checkpoint")
        return cls(**values)


def _shape_values(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the seed's state dict shows about its config."""
    vocab, hidden = state["token_embedding.weight" if "token_embedding.weight" in state else "lm_head.weight"].shape
    values: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden,
        num_layers=count_layers(state, "layers."),
        use_rezero="layers.0.rezero_alpha_attn" in state,
        use_mixture_of_experts="layers.0.mlp.gate.weight" in state)
    if values["use_mixture_of_experts"]:
        values["num_experts"] = state["layers.0.mlp.gate.weight"].shape[0]
        values["d_ff"] = state["layers.0.mlp.shared_expert.w1.weight"].shape[0]
    elif "layers.0.mlp.w1.weight" in state:
        values["d_ff"] = state["layers.0.mlp.w1.weight"].shape[0]
    return values


PRESETS = {
    "smart-llm": SmartLLMConfig(),
    "smart-llm-tiny": SmartLLMConfig(vocab_size=512, hidden_size=64, num_layers=2, n_heads=4, n_kv_heads=2,
                                     d_ff=96, max_context=256, sliding_window_size=8),
}


class GroupedQueryAttention(KernelAttention, nn.Module):
    """Decode-only steps may run in paged_gqa_decode (model/kernels), set by `use_decode_kernel`."""

    HAS_PREFILL_DTYPE = True

    def __init__(self, cfg: SmartLLMConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.wq = Linear(d, cfg.n_heads * hd, bias=False)
        self.wk = Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wv = Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wo = Linear(cfg.n_heads * hd, d, bias=False)
        self.scale = 1.0 / math.sqrt(hd)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [..., T, d] → q [..., T, H, hd], k [..., T, KV, hd] (both post-RoPE), v [..., T, KV, hd]."""
        cfg = self.cfg
        q = apply_rope(self.wq(x).unflatten(-1, (cfg.n_heads, cfg.head_dim)), cos, sin)
        k = apply_rope(self.wk(x).unflatten(-1, (cfg.n_kv_heads, cfg.head_dim)), cos, sin)
        return q, k, self.wv(x).unflatten(-1, (cfg.n_kv_heads, cfg.head_dim))

    def forward_full(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] → [B, T, d]; causal (and windowed) attention, no cache."""
        cfg = self.cfg
        seq = x.shape[1]
        group = cfg.n_heads // cfg.n_kv_heads
        q, k, v = self._qkv(x, cos, sin)
        q = q.transpose(1, 2)                                                         # [B, H, T, hd]
        k = k.transpose(1, 2).repeat_interleave(group, 1)                            # [B, H, T, hd]
        v = v.transpose(1, 2).repeat_interleave(group, 1)
        scores = (q @ k.transpose(-1, -2)).float() * self.scale                       # [B, H, T, T]
        pos = torch.arange(seq, device=x.device)
        visible = pos[None, :] <= pos[:, None]
        if cfg.sliding_window is not None:
            visible &= pos[None, :] >= pos[:, None] - cfg.sliding_window
        attn = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).to(v.dtype)
        return self.wo((attn @ v).transpose(1, 2).flatten(2))

    def forward_paged(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PagedBatch,
                      cache_layer: torch.Tensor) -> torch.Tensor:
        """x [T, d] → [T, d] over paged [K | V] rows; the window is in batch.attn_mask (or the kernel's)."""
        q, k, v = self._qkv(x, cos, sin)                                              # [T, H|KV, hd]
        return self.wo(paged_grouped_query_attention(q, k, v, batch, cache_layer, self.scale, self.decode_kernel,
                                                     self.prefill_dtype))


class SwiGLU(nn.Module):
    """`w3(silu(w1(x)) · w2(x))`: w1 gate, w2 up, w3 down, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class MixtureOfExperts(RoutedExperts, nn.Module):
    """`shared_expert(x) + Σ_topk softmax(top-k raw gate logits, float32)_e · routed_experts[e](x)`."""

    EXPERT_WEIGHTS = ("w1", "w2", "w3")     # SwiGLU's gate, up, down

    def __init__(self, cfg: SmartLLMConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_token
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.d_ff)
        self.routed_experts = nn.ModuleList(SwiGLU(cfg.hidden_size, cfg.d_ff) for _ in range(cfg.num_experts))
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.init_routing()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] → [..., d] (routing: see RoutedExperts)."""
        flat = x.reshape(-1, x.shape[-1])                                             # [T, d]
        top_logits, top_e = self.gate(flat).topk(self.top_k, dim=-1)                 # [T, k]
        top_w = torch.softmax(top_logits.to(torch.promote_types(x.dtype, torch.float32)), -1).to(x.dtype)
        return (self.shared_expert(flat) + self.routed(flat, top_w, top_e)).view_as(x)


class TransformerBlock(nn.Module):
    """`h + α_attn·attn(ln1(h))`, then `h + α_mlp·mlp(ln2(h))`; α are the ReZero scalars, else 1."""

    def __init__(self, cfg: SmartLLMConfig):
        super().__init__()
        self.ln1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ln2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = GroupedQueryAttention(cfg)
        self.mlp = MixtureOfExperts(cfg) if cfg.use_mixture_of_experts else SwiGLU(cfg.hidden_size, cfg.d_ff)
        if cfg.use_rezero:
            self.rezero_alpha_attn = nn.Parameter(torch.zeros(1))
            self.rezero_alpha_mlp = nn.Parameter(torch.zeros(1))
        self.use_rezero = cfg.use_rezero

    def residual(self, h: torch.Tensor, out: torch.Tensor, alpha: str) -> torch.Tensor:
        return h + getattr(self, alpha) * out if self.use_rezero else h + out

    def mlp_residual(self, h: torch.Tensor) -> torch.Tensor:
        return self.residual(h, self.mlp(self.ln2(h)), "rezero_alpha_mlp")


def _retie_after_load(module: "SmartLLMForCausalLM", _incompatible_keys) -> None:
    module.tie_weights()  # load_state_dict(assign=True) gives each key its own Parameter


class SmartLLMForCausalLM(nn.Module):
    """`lm_head.weight` is `token_embedding.weight` (one Parameter), and stays so through `.to()`,
    `to_empty()` and `load_state_dict(assign=True)`."""

    def __init__(self, config: SmartLLMConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_load_state_dict_post_hook(_retie_after_load)

    def tie_weights(self) -> None:
        self.lm_head.weight = self.token_embedding.weight

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.tie_weights()
        return self

    @staticmethod
    def is_ignored_checkpoint_key(key: str) -> bool:
        """The seed's rotary tables are non-persistent buffers: nothing to ignore."""
        return False

    @staticmethod
    def prepare_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Either tied key, or both holding the same values, becomes both keys on one tensor."""
        emb, head = state.get("token_embedding.weight"), state.get("lm_head.weight")
        if emb is None and head is None:
            return state
        if emb is not None and head is not None and emb is not head and not (
                emb.shape == head.shape and torch.equal(emb, head)):
            raise ValueError("token_embedding.weight and lm_head.weight differ; SmartLLM ties them, so a "
                             "checkpoint must hold one of them or the same values in both")
        tied = emb if emb is not None else head
        return {**state, "token_embedding.weight": tied, "lm_head.weight": tied}

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def forward_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] → logits [B, T, V]; plain causal (windowed) forward, no cache."""
        h = self.token_embedding(input_ids)                                          # [B, T, d]
        cos, sin = self._rope(torch.arange(input_ids.shape[1], device=input_ids.device), h.dtype)
        for layer in self.layers:
            h = layer.residual(h, layer.attention.forward_full(layer.ln1(h), cos, sin), "rezero_alpha_attn")
            h = layer.mlp_residual(h)
        return self.lm_head(self.ln_f(h))

    def forward_paged(self, batch: PagedBatch, cache: list[torch.Tensor]) -> torch.Tensor:
        """One step over the paged [K | V] cache → logits [N, V] for batch.logits_index."""
        h = self.token_embedding(batch.token_ids)                                    # [T, d]
        cos, sin = self._rope(batch.positions, h.dtype)                              # [T, hd]
        for layer, cache_layer in zip(self.layers, cache):
            attn = layer.attention.forward_paged(layer.ln1(h), cos, sin, batch, cache_layer)
            h = layer.residual(h, attn, "rezero_alpha_attn")
            h = layer.mlp_residual(h)
        return self.lm_head(self.ln_f(h[batch.logits_index]))


# The seed's checkpoint carries its pickled `ModelConfig` (read as a dict): the config comes from it.
FAMILY = FamilyRecord(
    name="smart_llm", config_class=SmartLLMConfig, model_class=SmartLLMForCausalLM, presets=PRESETS,
    markers=("layers.0.attention.wq.weight",), config_from_embedded=SmartLLMConfig.from_seed_config,
    prepare_state_dict=SmartLLMForCausalLM.prepare_state_dict, decode_kernel="paged_gqa_decode")
