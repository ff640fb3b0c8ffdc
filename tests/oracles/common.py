"""The formulas every oracle shares, written out plainly (float64 in the oracles)."""
from __future__ import annotations

import torch


def rms_norm(x, w, eps):
    """`w · x / sqrt(mean(x²) + eps)`."""
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope(v, positions, theta):
    """v [T, n, r] → rotate_half RoPE at absolute positions: inv_freq[j] = theta^(-2j/r),
    rope(v) = v·cos + [-b, a]·sin for v = [a, b]."""
    r = v.shape[-1]
    inv_freq = theta ** (-2.0 * torch.arange(r // 2, dtype=torch.float64) / r)
    angle = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([angle, angle], -1).cos()[:, None, :].to(v.dtype)
    sin = torch.cat([angle, angle], -1).sin()[:, None, :].to(v.dtype)
    a, b = v[..., : r // 2], v[..., r // 2:]
    return v * cos + torch.cat([-b, a], -1) * sin


def silu(z):
    return z * torch.sigmoid(z)
