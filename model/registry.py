"""Family name → model class. Every model class follows the `CausalLM` protocol below."""
from __future__ import annotations

import importlib
from typing import Protocol

import torch
from torch import nn

from model.config import BaseModelConfig
from model.cache.batch import PagedBatch

# family → "module:Class"; imported lazily so a family's module registers its presets on import.
FAMILY_MODULES = {
    "custom_llm": "model.families.custom_llm:CustomLLMForCausalLM",
    "llama": "model.families.llama:LlamaForCausalLM",
    "shomsher": "model.families.shomsher:ShomsherLLMForCausalLM",
    "smart_llm": "model.families.smart_llm:SmartLLMForCausalLM",
}


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


def output_head_weight(model: nn.Module) -> torch.Tensor:
    """The [V, d] matrix the output head multiplies by: `head_weight()` where the family defines it
    (Llama's tied head has no module of its own), else `lm_head.weight`."""
    return model.head_weight() if hasattr(model, "head_weight") else model.lm_head.weight


def model_class(family: str) -> type[nn.Module]:
    if family not in FAMILY_MODULES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILY_MODULES)}")
    module_name, class_name = FAMILY_MODULES[family].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(config: BaseModelConfig, device: torch.device | str = "meta",
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the module tree; on the meta device no parameter memory is allocated."""
    with torch.device(device):
        model = model_class(config.family)(config)
    return model.to(dtype=dtype) if str(device) != "meta" else model
