"""The model families: one `FamilyRecord` per family, declared in its module next to its config
class (`model/families/<name>.py: FAMILY`) and listed once in `model/families/__init__.py`.

A record is everything the rest of the code asks of a family: its config class and presets, its
module class, how to recognise its checkpoints and read a config from them, what to warn about, how
to prepare a state dict, and which fused decode-attention kernel its attention layers take. Every
model class follows the `CausalLM` protocol below.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from model.cache.batch import PagedBatch
    from model.config import BaseModelConfig

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FamilyRecord:
    """One model family, as the loader, the config parser and the kernel switch see it."""

    name: str                                          # the config's `family`
    config_class: type[BaseModelConfig]
    model_class: type[nn.Module]
    presets: Mapping[str, BaseModelConfig]
    markers: tuple[str, ...]                           # checkpoint keys only this family has
    # a config from the tensor shapes alone; None: they do not show enough of it
    infer_config: Callable[[StateDict], BaseModelConfig] | None = None
    # a config from one carried inside the checkpoint (as a dict), with the tensors to fill gaps
    config_from_embedded: Callable[[dict[str, Any], StateDict], BaseModelConfig] | None = None
    # raises CheckpointError for a checkpoint that looks like this family's but cannot be served as it;
    # asked of every family before the markers are
    check_checkpoint: Callable[[StateDict], None] | None = None
    # things about a checkpoint worth a warning (it loads all the same)
    warnings: Callable[[StateDict], list[str]] | None = None
    # the state dict as the module expects it (e.g. one tensor for both keys of a tied weight)
    prepare_state_dict: Callable[[StateDict], StateDict] | None = None
    # the fused decode-attention kernel of model/kernels its attention layers take ("attention
    # backend"); None: decode steps attend in PyTorch only
    decode_kernel: str | None = None


class CausalLM(Protocol):
    config: BaseModelConfig

    def forward_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] → logits [B, T, V]; plain causal forward, no cache."""

    def forward_paged(self, batch: PagedBatch, cache: list[torch.Tensor]) -> torch.Tensor:
        """One flat step over the paged cache (one [S, row_width] tensor per layer) → logits [N, V]
        for `batch.logits_index`."""

    @staticmethod
    def is_ignored_checkpoint_key(key: str) -> bool:
        """Checkpoint entries that are not parameters (e.g. saved rotary buffers)."""


def families() -> dict[str, FamilyRecord]:
    """Every family by name, in the order of `model.families.FAMILIES`."""
    from model.families import FAMILIES   # here, not at the top: each family module imports this one

    return {record.name: record for record in FAMILIES}


def family(name: str) -> FamilyRecord:
    known = families()
    if name not in known:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(known)}")
    return known[name]


def presets() -> dict[str, BaseModelConfig]:
    """Every family's presets by name (a name is unique across the families)."""
    found: dict[str, BaseModelConfig] = {}
    for record in families().values():
        for name, config in record.presets.items():
            assert name not in found, f"preset {name!r} is defined by two families"
            assert config.family == record.name, f"preset {name!r} is a {config.family} config"
            found[name] = config
    return found


def model_class(name: str) -> type[nn.Module]:
    return family(name).model_class


def build_model(config: BaseModelConfig, device: torch.device | str = "meta",
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the module tree; on the meta device no parameter memory is allocated."""
    with torch.device(device):
        model = model_class(config.family)(config)
    return model.to(dtype=dtype) if str(device) != "meta" else model


def output_head_weight(model: nn.Module) -> torch.Tensor:
    """The [V, d] matrix the output head multiplies by: `head_weight()` where the family defines it
    (Llama's tied head has no module of its own), else the `lm_head` Linear's."""
    return model.head_weight() if hasattr(model, "head_weight") else model.lm_head.dense_weight()
