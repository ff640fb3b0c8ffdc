"""RMSNorm, the normalisation CustomLLM, Llama and SmartLLM share (ShomsherLLM keeps its own norms)."""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import native

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_kernel: list = []             # [the C function, or None when it cannot be built here]


def _rms_norm_kernel():
    if not _kernel:
        _kernel.append(native.function("rms_norm", "rms_norm", None, [_PTR, _I64, _I64, _I64, _PTR, ctypes.c_float, _PTR]))
    return _kernel[0]


def cpu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Contiguous float32 CPU rows through the C kernel of native/rms_norm.c (one call, ~3 µs, where
    PyTorch's rms_norm is six ops, ~10-15 µs for a decode step's rows); None where it does not
    apply (another dtype or device, strided rows, inside torch.compile, no compiler). Kept lean:
    it runs twice per layer per step."""
    if not (x.is_cpu and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.is_contiguous()) \
            or torch.compiler.is_compiling():
        return None
    kernel = _kernel[0] if _kernel else _rms_norm_kernel()
    if kernel is None:
        return None
    dim = weight.shape[0]
    out = torch.empty_like(x)
    kernel(x.data_ptr(), x.numel() // dim, dim, dim, weight.data_ptr(), eps, out.data_ptr())
    return out


class RMSNorm(nn.Module):
    """`w · x / sqrt(mean(x²) + eps)`, normalised in float32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] → [..., dim]. float32 input: the C kernel on a CPU, else PyTorch's rms_norm (one
        op instead of six: it squares, averages, adds eps and multiplies by the reciprocal square root
        as below)."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            out = cpu_rms_norm(x, self.weight, self.eps)
            return out if out is not None else F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)
