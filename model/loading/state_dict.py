"""Strict assignment of a state dict to a model built on the meta device, and what the keys of a
state dict tell (the layer count)."""
from __future__ import annotations

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be served as it is; the message says exactly why."""


def count_layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    """Layers in a checkpoint whose per-layer keys read `{prefix}{i}.…` (e.g. prefix "layers.")."""
    return 1 + max(int(key[len(prefix):].split(".", 1)[0]) for key in state if key.startswith(prefix))


def _first(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """One CheckpointError naming the first missing, unexpected and mis-shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ignored = getattr(model, "is_ignored_checkpoint_key", lambda key: False)
    given = {k: tuple(v.shape) for k, v in state.items() if not ignored(k)}
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    misshaped = sorted(k for k in given if k in expected and given[k] != expected[k])
    if not (missing or unexpected or misshaped):
        return
    family = getattr(model.config, "family", type(model).__name__)
    parts = []
    if missing:
        parts.append(f"missing keys: {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_first(unexpected)}")
    if misshaped:
        parts.append("mis-shaped keys: " + _first(
            [f"{k} is {list(given[k])} in the checkpoint but {list(expected[k])} in the model" for k in misshaped]))
    raise CheckpointError(f"{source} does not match the {family} model: " + "; ".join(parts))


def assign_state_dict(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype,
                      device: torch.device | str, source: str) -> nn.Module:
    """Check keys strictly, convert each tensor to `dtype` on `device`, and assign them as the model's
    parameters (no second copy of the weights is made beyond one tensor at a time)."""
    check_keys(model, state, source)
    ignored = getattr(model, "is_ignored_checkpoint_key", lambda key: False)
    converted = {}
    for key in list(state):
        tensor = state.pop(key)
        if ignored(key):
            continue
        converted[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(converted, strict=True, assign=True)
    return model
