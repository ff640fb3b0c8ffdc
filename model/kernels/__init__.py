"""Triton kernels for the GPU fast path. Each has a PyTorch reference in the model code it replaces,
and is tested against it on the CPU under TRITON_INTERPRET=1 (tests/model/kernels/).

The model-level switch for the decode-attention kernels lives here: a family's record names the
kernel its attention layers take (`FamilyRecord.decode_kernel`), and each `KernelAttention` layer
is handed it through `use_decode_kernel`."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from model.layers.attention import KernelAttention
from model.registry import family

DECODE_KERNELS = ("paged_mla_decode", "paged_gqa_decode")


def decode_kernel(name: str) -> Callable:
    """The decode-attention kernel called `name` (imported on demand: it needs triton)."""
    if name == "paged_mla_decode":
        from model.kernels.paged_mla_decode import paged_mla_decode
        return paged_mla_decode
    if name == "paged_gqa_decode":
        from model.kernels.paged_gqa_decode import paged_gqa_decode
        return paged_gqa_decode
    raise ValueError(f"unknown decode kernel {name!r}; known: {', '.join(DECODE_KERNELS)}")


def attention_layers(model: nn.Module) -> list[KernelAttention]:
    """The attention layers of `model` that can decode through a kernel."""
    return [module for module in model.modules() if isinstance(module, KernelAttention)]


def use_triton_decode_attention(model: nn.Module) -> int:
    """Route the decode-only steps of every attention layer of `model` through the kernel its family
    names (MLA or grouped-query); returns how many layers now use one (0 for a family with none)."""
    name = family(model.config.family).decode_kernel
    if name is None:
        return 0
    kernel = decode_kernel(name)
    layers = attention_layers(model)
    for layer in layers:
        layer.use_decode_kernel(kernel)
    return len(layers)


def decodes_through_kernels(model: nn.Module) -> bool:
    """Every attention layer of `model` runs its decode steps in a kernel (so a decode batch needs
    no gather-path tensors)."""
    layers = attention_layers(model)
    return bool(layers) and all(layer.decode_kernel is not None for layer in layers)
