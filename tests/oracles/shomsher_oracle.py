"""Oracle for ShomsherLLM, written straight from the architecture's formulas (docs/architecture.md).

Works on a plain state dict (seed key names), one sequence at a time, full sequence, no cache,
per-head vectors built and rotated pair by pair, attention per head, MoE as a per-token loop.
Float64 throughout. `trap=True` computes the *wrong* model (rotating each head's W_*r block, as MLA
habit suggests, instead of the first rope_dim of the concatenated dims), only so a test can show the
difference matters.
"""
from __future__ import annotations

import math

import torch

from tests.oracles.common import silu


def layer_norm(x, scale, shift, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return scale * (x - mean) / torch.sqrt(var + eps) + shift


def rms_norm(x, scale, eps):
    return scale * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rotate_pairs(v, p, rope_dim, divisor, theta):
    """v [n] with n >= rope_dim: dims i and i + rope_dim/2 (i < rope_dim/2) rotated by
    (p / divisor) · theta^(-2i/rope_dim); dims from rope_dim on pass unchanged."""
    half = rope_dim // 2
    out = v.clone()
    for i in range(half):
        angle = (p / divisor) * theta ** (-2.0 * i / rope_dim)
        c, s = math.cos(angle), math.sin(angle)
        a, b = v[i], v[i + half]
        out[i] = a * c - b * s
        out[i + half] = b * c + a * s
    return out


def linear(sd, name, x):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def expert(sd, prefix, x):
    z = linear(sd, prefix + "ffn.0", x)
    z = linear(sd, prefix + "ffn.1.w3", linear(sd, prefix + "ffn.1.w1", z) * silu(linear(sd, prefix + "ffn.1.w2", z)))
    return linear(sd, prefix + "ffn.2", z)


def oracle_logits(sd: dict, cfg, token_ids: list[int], dtype=torch.float64, trap: bool = False) -> torch.Tensor:
    """Logits [T, V] for one sequence."""
    sd = {k: v.to(dtype) for k, v in sd.items() if v.is_floating_point()}
    T = len(token_ids)
    H, d = cfg.num_heads, cfg.hidden_size
    hd = d // H
    r = cfg.rope_dim
    nope = hd - r
    eps = cfg.norm_eps
    h = sd["tok_emb.weight"][torch.tensor(token_ids)]
    for i in range(cfg.num_layers):
        p = f"t_blocks.{i}."
        a = p + "mhattention."
        x = layer_norm(h, sd[p + "ln1.scale"], sd[p + "ln1.shift"], eps)
        c_kv = linear(sd, a + "W_dkv", x)
        c_q = linear(sd, a + "W_dq", x)
        uk, kr = linear(sd, a + "W_uk", c_kv), linear(sd, a + "W_kr", c_kv)
        uq, qr = linear(sd, a + "W_uq", c_q), linear(sd, a + "W_qr", c_q)
        v = linear(sd, a + "W_uv", c_kv)
        q = torch.zeros(T, H, hd, dtype=dtype)
        k = torch.zeros(T, H, hd, dtype=dtype)
        for t in range(T):
            for head in range(H):
                q_vec = torch.cat([uq[t, head * nope:(head + 1) * nope], qr[t, head * r:(head + 1) * r]])
                k_vec = torch.cat([uk[t, head * nope:(head + 1) * nope], kr[t, head * r:(head + 1) * r]])
                rot = lambda vec: rotate_pairs(vec, t, r, cfg.rope_divisor, cfg.rope_theta)  # noqa: E731
                if trap:  # rotate the W_*r block (dims nope .. hd) instead of the first r dims
                    q_vec = torch.cat([q_vec[:nope], rot(q_vec[nope:])])
                    k_vec = torch.cat([k_vec[:nope], rot(k_vec[nope:])])
                else:
                    q_vec, k_vec = rot(q_vec), rot(k_vec)
                q[t, head], k[t, head] = q_vec, k_vec
        out = torch.zeros(T, H * hd, dtype=dtype)
        for head in range(H):
            s = (q[:, head] @ k[:, head].T) / math.sqrt(hd)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).tril().logical_not(), float("-inf"))
            out[:, head * hd:(head + 1) * hd] = torch.softmax(s, -1) @ v[:, head * hd:(head + 1) * hd]
        h = h + rms_norm(linear(sd, a + "output", out), sd[p + "rmsnorm1.scale"], eps)

        x = layer_norm(h, sd[p + "ln2.scale"], sd[p + "ln2.shift"], eps)
        m = p + "ff.moe."
        moe_out = torch.zeros_like(x)
        for t in range(T):
            probs = torch.softmax(linear(sd, m + "gate", x[t]), -1)
            top_p, top_e = probs.topk(cfg.top_k_experts)
            top_p = top_p / top_p.sum()
            moe_out[t] = sum(w * expert(sd, f"{m}experts.{int(e)}.", x[t]) for w, e in zip(top_p, top_e))
        h = h + rms_norm(moe_out, sd[p + "rmsnorm2.scale"], eps)
    h = layer_norm(h, sd["final_ln.scale"], sd["final_ln.shift"], eps)
    return linear(sd, "lm_head", h)
