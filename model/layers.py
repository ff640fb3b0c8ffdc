"""Building blocks shared by the families: RMSNorm, rotate_half RoPE, the SwiGLU expert."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """`w · x / sqrt(mean(x²) + eps)`, normalised in float32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, rope_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_dim] for absolute positions [T] (angles computed in float64).

    `inv_freq[j] = theta^(-2j/rope_dim)`; `angle = positions * scale * inv_freq`, duplicated to full width.
    """
    j = torch.arange(0, rope_dim // 2, device=positions.device, dtype=torch.float64)
    inv_freq = theta ** (-2.0 * j / rope_dim)                                    # [r/2]
    angle = (positions.to(torch.float64) * scale)[:, None] * inv_freq[None, :]   # [T, r/2]
    angle = torch.cat([angle, angle], dim=-1)                                    # [T, r]
    return angle.cos().to(dtype), angle.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, r] rotated with rotate_half; cos/sin [T, r]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class SwiGLUExpert(nn.Module):
    """`down(silu(gate(x)) · up(x))` with the names of the CustomLLM checkpoint."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
