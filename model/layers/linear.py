"""`Linear`: the one linear projection every family uses, and so the one place that knows how a
weight matrix is stored.

It is `nn.Linear` (same parameters, same state-dict keys, same `forward`, except that activations of
another dtype are converted to the weight's and the result back, as a QuantizedLinear does); what
it adds is the small API the rest of the model uses instead of reaching into `.weight`:

- `dense_weight()`: the weight as a dense [out, in] tensor, for code that splits it per head (the
  absorbed latent attention of CustomLLM and ShomsherLLM) or stacks experts' weights;
- `keep_weight_in(storage)`: let a tensor of the same shape and values (one slice of the stacked
  [E, out, in] expert weights) hold the weight from now on, so no second copy is kept;
- `use_column_major()`: the CPU float32 layout of model/layers/cpu_layout.py, for this weight;
- `input_dtype(rows)`: the dtype the product wants its activations in (None: any), so that a caller
  running several products on one input converts it once.

The quantized Linear plugs in as a subclass: `QuantizedLinear` (model/layers/quantized_linear.py)
holds packed int4/int8 (or bfloat16) weights and scales as buffers instead of the float `weight`
parameter; `forward` runs the kernel on bfloat16 activations and returns the model's dtype;
`dense_weight()` dequantizes once and caches (so the MLA absorption and the expert stacks keep
working); `keep_weight_in` keeps its packed weights; `use_column_major` returns False. A family's
module tree is unchanged: it is built with `Linear`, and loading swaps each one it quantizes.

`FusableProjections` is the mixin of a module whose projections of one input may run as one product
once they are quantized (`fuse_quantized_projections` in model/layers/quantized_linear.py joins them;
float weights stay separate, so the float32 path keeps its exact products).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def use_column_major_(weight: torch.Tensor) -> bool:
    """Store a float32 CPU matrix column-major in place of its row-major copy (same shape, same
    values, strides (1, out)); False when it is not one to move (other dtype or device, already
    moved, a vector). See model/layers/cpu_layout.py for why."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2 \
            and weight.is_contiguous() and min(weight.shape) > 1:
        weight.data = weight.data.t().contiguous().t()          # [out, in], strides (1, out)
        return True
    return False


class Linear(nn.Linear):
    """`y = x W^T + b` with W [out, in] (nn.Linear), plus the storage API above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] → [..., out] in x's dtype. Another dtype than the weight's happens where the
        products of one input are held in different formats (an expert whose narrow gate and up stay
        float while its down projection takes bfloat16 activations): converted, not refused."""
        if x.dtype == self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    def dense_weight(self) -> torch.Tensor:
        """W as a dense [out, in] tensor (the parameter itself for a float Linear)."""
        return self.weight

    def keep_weight_in(self, storage: torch.Tensor) -> None:
        """From now on `storage` ([out, in], the weight's values) holds W; the parameter stays the
        same object, so state dicts and optimisers see no change."""
        assert storage.shape == self.weight.shape, (tuple(storage.shape), tuple(self.weight.shape))
        self.weight.data = storage

    def use_column_major(self) -> bool:
        """Store W column-major when it is a float32 CPU matrix (see `use_column_major_`)."""
        return use_column_major_(self.weight)

    def input_dtype(self, rows: int) -> torch.dtype | None:
        """The dtype a product over `rows` rows computes on (None: the input's own)."""
        return None


class FusableProjections:
    """Mixin of an nn.Module whose Linears of one input (FUSABLE: fused name → part names, in row
    order) may be joined into one Linear of all their rows; `project(fused, x)` gives the parts'
    outputs [..., out_i] in order, from the joined product when there is one."""

    FUSABLE: dict[str, tuple[str, ...]] = {}

    def project(self, fused: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sizes = self.__dict__.get("fused_sizes", {}).get(fused)
        if sizes is None:
            return tuple(getattr(self, part)(x) for part in self.FUSABLE[fused])
        return getattr(self, fused)(x).split(sizes, dim=-1)

    def join(self, fused: str, layer: Linear) -> None:
        """`layer` (the parts' rows in order) replaces the parts of `fused`."""
        parts = self.FUSABLE[fused]
        sizes = [getattr(self, part).out_features for part in parts]
        assert layer.out_features == sum(sizes), (layer.out_features, sizes)
        for part in parts:
            delattr(self, part)
        setattr(self, fused, layer)
        self.fused_sizes = {**self.__dict__.get("fused_sizes", {}), fused: sizes}

    def fused_parts(self, fused: str) -> list[tuple[str, int]]:
        """(part name, rows) of a joined Linear, in row order; empty when `fused` is not joined."""
        return list(zip(self.FUSABLE[fused], self.__dict__.get("fused_sizes", {}).get(fused, ())))
