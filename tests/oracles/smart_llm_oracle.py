"""Oracle for SmartLLM, written straight from the architecture's formulas (docs/architecture.md).

Works on a plain state dict (seed key names), one sequence at a time, full sequence, no cache;
attention per query head with its own kv head looked up, the window as an explicit key range, the
MLP per token. Float64 throughout.
"""
from __future__ import annotations

import math

import torch

from tests.oracles.common import rms_norm, rope, silu


def swiglu(sd, prefix, x):
    return (silu(x @ sd[prefix + "w1.weight"].T) * (x @ sd[prefix + "w2.weight"].T)) @ sd[prefix + "w3.weight"].T


def oracle_logits(sd: dict, cfg, token_ids: list[int], dtype=torch.float64) -> torch.Tensor:
    """Logits [T, V] for one sequence. `cfg` needs n_heads, n_kv_heads, use_rezero,
    use_mixture_of_experts, num_experts_per_token, sliding_window (W or None), rms_norm_eps, rope_theta."""
    sd = {k: v.to(dtype) for k, v in sd.items() if v.is_floating_point()}
    T = len(token_ids)
    pos = torch.arange(T)
    H, KV = cfg.n_heads, cfg.n_kv_heads
    d = sd["token_embedding.weight"].shape[1]
    hd = d // H
    eps = cfg.rms_norm_eps
    h = sd["token_embedding.weight"][torch.tensor(token_ids)]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        alpha_attn = sd[p + "rezero_alpha_attn"] if cfg.use_rezero else 1.0
        alpha_mlp = sd[p + "rezero_alpha_mlp"] if cfg.use_rezero else 1.0

        x = rms_norm(h, sd[p + "ln1.weight"], eps)
        a = p + "attention."
        q = rope((x @ sd[a + "wq.weight"].T).view(T, H, hd), pos, cfg.rope_theta)
        k = rope((x @ sd[a + "wk.weight"].T).view(T, KV, hd), pos, cfg.rope_theta)
        v = (x @ sd[a + "wv.weight"].T).view(T, KV, hd)
        out = torch.zeros(T, H, hd, dtype=dtype)
        for head in range(H):
            kv_head = head // (H // KV)
            for t in range(T):
                first = 0 if cfg.sliding_window is None else max(0, t - cfg.sliding_window)
                s = (k[first:t + 1, kv_head] @ q[t, head]) / math.sqrt(hd)
                out[t, head] = torch.softmax(s, -1) @ v[first:t + 1, kv_head]
        h = h + alpha_attn * (out.reshape(T, H * hd) @ sd[a + "wo.weight"].T)

        x = rms_norm(h, sd[p + "ln2.weight"], eps)
        m = p + "mlp."
        if not cfg.use_mixture_of_experts:
            mlp_out = swiglu(sd, m, x)
        else:
            mlp_out = torch.zeros_like(x)
            for t in range(T):
                top_logits, top_e = (x[t] @ sd[m + "gate.weight"].T).topk(cfg.num_experts_per_token)
                weights = torch.softmax(top_logits, -1)
                routed = sum(w * swiglu(sd, f"{m}routed_experts.{int(e)}.", x[t]) for w, e in zip(weights, top_e))
                mlp_out[t] = swiglu(sd, m + "shared_expert.", x[t]) + routed
        h = h + alpha_mlp * mlp_out
    h = rms_norm(h, sd["ln_f.weight"], eps)
    return h @ sd["lm_head.weight"].T
