"""RMSNorm, the normalisation CustomLLM, Llama and SmartLLM share (ShomsherLLM keeps its own norms)."""
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
        """x [..., dim] → [..., dim]. float32 input: PyTorch's rms_norm, one op instead of six (the same
        values: it squares, averages, adds eps and multiplies by the reciprocal square root as below)."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)
