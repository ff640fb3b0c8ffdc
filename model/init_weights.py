"""Random initialisation for test and benchmark checkpoints (`customllm weights init`)."""
from __future__ import annotations

import torch
from torch import nn

from model.config import BaseModelConfig
from model.registry import build_model


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Matrices and embeddings ~ N(0, std²); norm scales 1; biases and routing biases 0.

    Deterministic for a seed, whatever the device: drawn on the CPU in float32, then copied.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            values = torch.randn(param.shape, generator=generator) * std
        elif name.endswith(("norm.weight", ".scale", "ln1.weight", "ln2.weight", "ln_f.weight")):
            values = torch.ones(param.shape)
        else:
            values = torch.zeros(param.shape)
        param.copy_(values.to(param.dtype))
    return model


def random_model(config: BaseModelConfig, seed: int = 0, std: float = 0.02,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    model = build_model(config, device="meta")
    model.to_empty(device=device)
    model.to(dtype)
    return init_random_(model, seed, std).eval()
