"""Oracle for CustomLLM-973M, written straight from the architecture's formulas (docs/architecture.md).

Works on a plain state dict (seed key names), one sequence at a time, full sequence, no cache,
per-head K and V expanded, MoE as a per-token loop. Float64 throughout unless told otherwise.
"""
from __future__ import annotations

import math

import torch

from tests.oracles.common import rms_norm, rope, silu


def expert(sd, prefix, x):
    gate = x @ sd[prefix + "gate_proj.weight"].T
    up = x @ sd[prefix + "up_proj.weight"].T
    return (silu(gate) * up) @ sd[prefix + "down_proj.weight"].T


def oracle_logits(sd: dict, cfg, token_ids: list[int], dtype=torch.float64) -> torch.Tensor:
    """Logits [T, V] for one sequence."""
    sd = {k: v.to(dtype) for k, v in sd.items() if v.is_floating_point()}
    T = len(token_ids)
    ids = torch.tensor(token_ids)
    pos = torch.arange(T)
    H, hd, r = cfg.num_heads, cfg.head_dim, cfg.rope_dim
    nope = hd - r
    h = sd["token_embeddings.weight"][ids] + sd["position_embeddings.weight"][pos]
    for i in range(cfg.num_layers):
        p = f"decoder_layers.{i}."
        x = rms_norm(h, sd[p + "input_norm.weight"], cfg.rms_norm_eps)
        a = p + "self_attn."
        c_kv = x @ sd[a + "kv_proj_d.weight"].T
        c_q = x @ sd[a + "q_proj_d.weight"].T
        k_nope = (c_kv @ sd[a + "k_proj_u.weight"].T).view(T, H, nope)
        v = (c_kv @ sd[a + "v_proj_u.weight"].T).view(T, H, hd)
        q_nope = (c_q @ sd[a + "q_proj_u.weight"].T).view(T, H, nope)
        k_rope = rope((x @ sd[a + "rope_k.weight"].T).view(T, H, r), pos, cfg.rope_theta)
        q_rope = rope((c_q @ sd[a + "rope_q.weight"].T).view(T, H, r), pos, cfg.rope_theta)
        q = torch.cat([q_nope, q_rope], -1)
        k = torch.cat([k_nope, k_rope], -1)
        out = torch.zeros(T, H, hd, dtype=dtype)
        for head in range(H):
            s = (q[:, head] @ k[:, head].T) / math.sqrt(hd)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).tril().logical_not(), float("-inf"))
            out[:, head] = torch.softmax(s, -1) @ v[:, head]
        h = h + out.reshape(T, H * hd) @ sd[a + "o_proj.weight"].T

        x = rms_norm(h, sd[p + "post_attn_norm.weight"], cfg.rms_norm_eps)
        m = p + "mlp.moe."
        moe_out = torch.zeros_like(x)
        for t in range(T):
            shared = sum(expert(sd, f"{m}shared_experts.{j}.", x[t]) for j in range(cfg.num_shared_experts))
            if cfg.num_shared_experts > 1:
                shared = shared / cfg.num_shared_experts
            s = torch.sigmoid(x[t] @ sd[m + "router.weight"].T + sd[m + "routing_bias"])
            top_s, top_e = s.topk(cfg.top_k_experts)
            top_s = top_s / top_s.sum()
            routed = sum(w * expert(sd, f"{m}routed_experts.{int(e)}.", x[t]) for w, e in zip(top_s, top_e))
            moe_out[t] = shared + routed
        h = h + moe_out
    return h @ sd["lm_head.weight"].T + sd["lm_head.bias"]
