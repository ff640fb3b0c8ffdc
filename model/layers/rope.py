"""Rotary position embeddings in the rotate_half form: the cos/sin tables and the rotation."""
from __future__ import annotations

import torch


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
    """x [..., T, H, r] rotated with rotate_half; cos/sin [T, r] broadcast over the heads."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)                  # [..., T, H, r]
    return x * cos[:, None, :] + rotated * sin[:, None, :]
