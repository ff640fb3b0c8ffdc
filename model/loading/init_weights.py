"""Random initialisation for test and benchmark checkpoints (`customllm weights init`)."""
from __future__ import annotations

import json
from pathlib import Path

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


def save_checkpoint(model: nn.Module, out: Path, config_fields: dict) -> Path:
    """`out/model.safetensors` (a tied weight, such as SmartLLM's head, saved once under its first
    name) and `out/config.json` with `config_fields` (a preset name and overrides)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state, storages = {}, set()
    for key, tensor in model.state_dict().items():
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:
            continue
        storages.add(storage)
        state[key] = tensor.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_fields, indent=2) + "\n")
    return out / "model.safetensors"
