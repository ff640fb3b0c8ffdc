"""Weight layout for float32 matrix products on the CPU.

`F.linear(x, W)` with W stored [out, in] row-major (PyTorch's default) multiplies x [M, in] by W's
transpose. For a few rows — decode batches of 2 to ~32 tokens — MKL's single-precision GEMM is
slow on that layout: on the 2-core Xeon of docs/benchmarks.md, [16, 576] × [576, 3072] takes 1.41 ms
with W row-major and 0.33 ms with the same values stored column-major (W.t() contiguous), and the
tied 49152-row head 21.4 vs 10.1 ms; one row and large chunks (≥ 64 rows) cost the same either way.
So a float32 model on the CPU keeps its matrices column-major: same shape, same values, strides
(1, out). Nothing else changes (splitting a dimension, as the MLA absorption does, is still a view).
Each `Linear` (model/layers/linear.py) moves its own weight; a tied head held by no `Linear` (Llama's
embedding table) is moved here.

bfloat16 gains nothing (oneDNN packs its own layout) and float16 loses 10-30× on a column-major
weight, so only float32 CPU tensors are moved.
"""
from __future__ import annotations

import torch
from torch import nn

from model.layers.linear import Linear, use_column_major_
from model.layers.quantized_linear import QuantizedLinear, quantized_head
from model.registry import output_head_weight


def _linears(model: nn.Module) -> list[Linear]:
    """The float `Linear`s (a QuantizedLinear keeps its weights in its kernel's layout)."""
    return [module for module in model.modules() if isinstance(module, Linear)
            and not isinstance(module, QuantizedLinear)]


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """Every float matrix the model multiplies through `F.linear`: each float `Linear`'s weight and
    the output head (which may be the embedding table) unless it is quantized, each once."""
    found = {id(weight): weight for weight in (linear.dense_weight() for linear in _linears(model))}
    if not quantized_head(model):
        head = output_head_weight(model)
        found[id(head)] = head
    return list(found.values())


def use_column_major_weights(model: nn.Module) -> int:
    """Store the model's float32 CPU linear weights column-major, each in place of its row-major
    copy (one matrix extra at a time): every `Linear` through its own `use_column_major()`, then a
    tied head that no `Linear` holds. Returns the number of matrices moved."""
    moved, seen = 0, set()
    for linear in _linears(model):
        weight = linear.dense_weight()
        if id(weight) not in seen:
            seen.add(id(weight))
            moved += linear.use_column_major()
    if quantized_head(model):
        return moved
    head = output_head_weight(model)
    if id(head) not in seen:
        moved += use_column_major_(head)
    return moved
