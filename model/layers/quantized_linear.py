"""`QuantizedLinear`: the one Linear (model/layers/linear.py) with its weight held in the packed form
of a fast CPU kernel instead of a float32 matrix.

A weight has *values* (what it was rounded to: "float", "int8" or "int4", see
model/layers/quantize.py) and one or two *formats* (how it is stored and multiplied):

| format   | storage                                       | product                                      |
|----------|-----------------------------------------------|----------------------------------------------|
| float32  | [out, in] float32, column-major (cpu_layout)  | `F.linear`                                   |
| bfloat16 | [out, in] bfloat16                            | `F.linear` on bfloat16 activations           |
| int8     | int8 [out, in] + bfloat16 scale per row       | `_weight_int8pack_mm`, bfloat16 activations  |
| int4     | packed uint8 [out, in/2] + bfloat16 (scale, zero) per 32 columns | `_weight_int4pack_mm_for_cpu` |
| int4-dot | codes + float32 (scale, minimum) per 32 columns, by 64 rows | int8 dot products (integer_dot) |
| int8-dot | codes + 128 as uint8 + float32 scale per row  | int8 dot products (integer_dot)               |

The two "-dot" formats (model/layers/integer_dot.py, llama.cpp's way) quantize the activations on
the fly per group of 32 columns to two int8 digits (~15 bits) and multiply with AVX512-VNNI byte dot
products; every other quantized format multiplies bfloat16 activations.

`small_format` serves steps of at most SMALL_ROWS rows (one or a few decode tokens), `large_format`
steps of up to PREFILL_ROWS (decode batches), `prefill_format` bigger ones (prompt chunks);
model/layers/kernel_choice.py picks the three per shape by timing them on the machine (one copy of
the weight per distinct format). Activations are converted at the boundary: the layer takes and returns
the model's dtype (float32), so norms, softmax, the cache and the logits never see bfloat16.

`dense_weight()` dequantizes once and caches the [out, in] matrix (the absorbed latent attention
splits it per head); `keep_weight_in` keeps the packed weights (a stacked expert copy is extra
memory); `use_column_major` is False (the layout is the kernel's or already column-major).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import integer_dot
from model.layers.linear import FusableProjections, Linear, use_column_major_
from model.layers.quantize import (GROUP, INT4, INT8, QuantizedWeight, check_int4_layout, dequantize_int4_packed,
                                   head_kind, pack_int4, pack_int8, quantize, unpack_int4_codes)

FLOAT32, BFLOAT16 = "float32", "bfloat16"
INT4_DOT, INT8_DOT = "int4-dot", "int8-dot"
FORMATS = (FLOAT32, BFLOAT16, INT8, INT4, INT8_DOT, INT4_DOT)
DOT_FORMATS = {INT4: INT4_DOT, INT8: INT8_DOT}          # values → their integer-dot format
FLOAT = "float"                 # the values of a weight that was never quantized
SMALL_ROWS = 4                  # steps of at most this many rows take the small-step format
PREFILL_ROWS = 64               # steps of more rows than this take the prefill format
PROMPT_PIECE_ROWS = 512         # the rows of one piece of a dense product taken in pieces (`prompt_pieces`)
MIN_QUANTIZED_OUT = 16          # narrower Linears (MoE routers: a few experts) keep float weights

_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu
_INT8_MM = torch.ops.aten._weight_int8pack_mm

_BUFFERS = {FLOAT32: ("weight_f32",), BFLOAT16: ("weight_bf16",), INT8: ("weight_int8", "scales_int8"),
            INT4: ("weight_int4", "scale_zeros_int4"),
            INT4_DOT: ("weight_int4_dot",),
            INT8_DOT: ("weight_int8_dot", "scale_int8_dot")}


def format_supported(fmt: str, out_features: int, in_features: int) -> bool:
    """Whether a [out, in] weight can be stored in `fmt` (the kernels' shape rules: int4 needs
    out % 16 and in % 32, int8 in % 16, int4-dot in % 32; the "-dot" formats a C compiler; narrow layers
    stay float)."""
    if fmt in (FLOAT32, BFLOAT16):
        return True
    if out_features < MIN_QUANTIZED_OUT:
        return False
    if fmt == INT4:
        return out_features % 16 == 0 and in_features % GROUP == 0
    if fmt == INT8:
        return in_features % 16 == 0
    if fmt in (INT4_DOT, INT8_DOT):
        return (fmt == INT8_DOT or in_features % GROUP == 0) and integer_dot.available()
    raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")


def format_bytes(fmt: str, out_features: int, in_features: int) -> int:
    """Bytes a [out, in] weight takes (and a product reads) in `fmt`."""
    n, k = out_features, in_features
    n_pad, k_pad = -(-n // integer_dot.TILE) * integer_dot.TILE, -(-k // GROUP) * GROUP
    return {FLOAT32: 4 * n * k, BFLOAT16: 2 * n * k, INT8: n * k + 2 * n,
            INT4: n * k // 2 + (k // GROUP) * n * 2 * 2, INT8_DOT: n_pad * k_pad + 4 * n_pad,
            INT4_DOT: n_pad * k // 2 + (k // GROUP) * n_pad * 2 * 4}[fmt]


def formats_for(values: str) -> tuple[str, ...]:
    """The formats that hold weights of these values: their own kernel's, and dense copies."""
    return {FLOAT: (FLOAT32, BFLOAT16), INT8: (INT8, INT8_DOT, BFLOAT16, FLOAT32),
            INT4: (INT4, INT4_DOT, BFLOAT16, FLOAT32)}[values]


class QuantizedLinear(Linear):
    """`y = x W^T + b` with W held in one or two formats (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, values: str, small_format: str, large_format: str,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 prefill_format: str | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.values, self.small_format, self.large_format = values, small_format, large_format
        self.prefill_format = prefill_format or large_format
        self.dtype = dtype              # the model's: what forward returns and dense_weight gives
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().to(dtype),
                                                                              requires_grad=False))
        self._dense: torch.Tensor | None = None
        # row ranges (lo, hi] whose dense (float32, bfloat16) products run in PROMPT_PIECE_ROWS-row pieces:
        # where oneDNN's blocking for that many rows measured slower than for the pieces (kernel_choice)
        self.prompt_pieces: tuple[tuple[int, int], ...] = ()
        # a layer of quantized values held in dense formats only may keep a way to its codes (the
        # packed layers it was made from) until the decode step's choice is made (`hold_codes`)
        self._held_codes = None

    def hold_codes(self, codes) -> None:
        """Keep `codes` (called with no arguments: this layer's QuantizedWeight, from the packed
        layers it was made from) for `quantized_weight()` when no format of this one holds codes;
        `release_held_codes` lets go."""
        if self.values != FLOAT and not set(self.formats) - {FLOAT32, BFLOAT16}:
            self._held_codes = codes

    def codes_source(self):
        """`quantized_weight` of this layer, for a layer made from it to `hold_codes`: its dense
        cache is dropped first (it is kept for its packed codes alone)."""
        self._dense = None
        return self.quantized_weight

    @property
    def holds_codes(self) -> bool:
        """Whether `quantized_weight()` can give this layer's codes."""
        return bool(set(self.formats) - {FLOAT32, BFLOAT16}) or self._held_codes is not None

    @classmethod
    def from_weight(cls, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None, small_format: str,
                    large_format: str, dtype: torch.dtype = torch.float32,
                    prefill_format: str | None = None) -> "QuantizedLinear":
        """A layer over `weight` (float [out, in], or quantized codes) stored in the formats (the
        prefill one defaults to the large one); an int4 or int8 format needs weights of those values
        (quantize first: `quantize_linear`)."""
        values = weight.kind if isinstance(weight, QuantizedWeight) else FLOAT
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, values, small_format, large_format, bias, dtype, prefill_format)
        for fmt in layer.formats:
            if fmt not in formats_for(values) or not format_supported(fmt, out_features, in_features):
                raise ValueError(f"a [{out_features}, {in_features}] weight of {values} values cannot be stored as {fmt}")
            if fmt == INT4:
                tensors = pack_int4(weight)
            elif fmt == INT8:
                tensors = pack_int8(weight)
            elif fmt == INT4_DOT:
                tensors = (integer_dot.pack_int4_dot(weight),)
            elif fmt == INT8_DOT:
                tensors = integer_dot.pack_int8_dot(weight)
            else:
                dense = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight.detach()
                tensors = (dense.to(torch.float32 if fmt == FLOAT32 else torch.bfloat16).contiguous(),)
                if fmt == FLOAT32:
                    use_column_major_(tensors[0])
            for name, tensor in zip(_BUFFERS[fmt], tensors):
                layer.register_buffer(name, tensor)
        return layer

    @classmethod
    def holding(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> "QuantizedLinear":
        """A layer over quantized codes in their own kernel's format, or, where the shape does not
        allow that kernel, as a float32 matrix of the very same values. On a CPU with AVX512-VNNI
        the kernel is the integer-dot one, which keeps the scales in float32: a GGUF's float16
        scales exactly (PyTorch's int4 kernel rounds them to bfloat16)."""
        dot = DOT_FORMATS[weight.kind]
        fmt = dot if integer_dot.has_vnni() and format_supported(dot, *weight.shape) else \
            weight.kind if format_supported(weight.kind, *weight.shape) else FLOAT32
        return cls.from_weight(weight, bias, fmt, fmt, dtype)

    def with_formats(self, small_format: str, large_format: str,
                     prefill_format: str | None = None) -> "QuantizedLinear":
        """The same weights in other formats: packed ones are shared, dense ones made from
        `dense_weight()` and other packed ones from `quantized_weight()` (so a copy of int4 values
        holds exactly what the int4 product used)."""
        layer = QuantizedLinear(self.in_features, self.out_features, self.values, small_format, large_format,
                                self.bias, self.dtype, prefill_format)
        if layer.prefill_format == self.prefill_format:
            layer.prompt_pieces = self.prompt_pieces
        for fmt in layer.formats:
            if fmt in self.formats:
                for name in _BUFFERS[fmt]:
                    layer.register_buffer(name, getattr(self, name))
            elif fmt in (FLOAT32, BFLOAT16) and fmt in formats_for(self.values):
                dense = self.dense_weight().to(torch.float32 if fmt == FLOAT32 else torch.bfloat16).contiguous()
                if fmt == FLOAT32:
                    use_column_major_(dense)
                layer.register_buffer(_BUFFERS[fmt][0], dense)
            elif fmt in formats_for(self.values) and self.values != FLOAT:
                packed = QuantizedLinear.from_weight(self.quantized_weight(), None, fmt, fmt)
                for name in _BUFFERS[fmt]:
                    layer.register_buffer(name, getattr(packed, name))
            else:
                raise ValueError(f"{self.values} values held as {'/'.join(self.formats)} cannot become {fmt}")
        return layer

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.small_format, self.large_format, self.prefill_format)))

    def format_for(self, rows: int) -> str:
        return self.small_format if rows <= SMALL_ROWS else self.large_format if rows <= PREFILL_ROWS else \
            self.prefill_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] → [..., out] in x's dtype."""
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)                # [M, in]
        rows = flat.shape[0]
        fmt = self.small_format if rows <= SMALL_ROWS else self.large_format if rows <= PREFILL_ROWS else \
            self.prefill_format
        if fmt == INT4_DOT:                                                           # the decode path first
            y = integer_dot.int4_dot_mm(flat, self.weight_int4_dot, self.out_features)
        elif fmt == INT8_DOT:
            y = integer_dot.int8_dot_mm(flat, self.weight_int8_dot, self.scale_int8_dot, self.out_features)
        elif fmt == INT4 and rows:
            y = _INT4_MM(flat.to(torch.bfloat16).contiguous(), self.weight_int4, GROUP, self.scale_zeros_int4)
        elif fmt == FLOAT32:
            y = self._dense_product(flat.to(self.weight_f32.dtype), self.weight_f32)
        elif fmt == BFLOAT16:
            y = self._dense_product(flat.to(torch.bfloat16), self.weight_bf16)
        elif rows == 0:
            y = flat.new_zeros(0, self.out_features)
        else:
            y = _INT8_MM(flat.to(torch.bfloat16).contiguous(), self.weight_int8, self.scales_int8)
        y = y.to(x.dtype)                                                              # [M, out]
        bias = self.bias
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def _dense_product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [M, in] W^T → [M, out], in PROMPT_PIECE_ROWS-row pieces where M lies in a `prompt_pieces` range."""
        rows = x.shape[0]
        if rows <= PROMPT_PIECE_ROWS or not any(lo < rows <= hi for lo, hi in self.prompt_pieces):
            return F.linear(x, weight)
        out = x.new_empty(rows, weight.shape[0])                                     # [M, out]
        for start in range(0, rows, PROMPT_PIECE_ROWS):
            torch.mm(x[start:start + PROMPT_PIECE_ROWS], weight.t(), out=out[start:start + PROMPT_PIECE_ROWS])
        return out

    def dense_weight(self) -> torch.Tensor:
        """W [out, in] in the model's dtype: the values the products multiply by, dequantized once
        and cached (the float32 copy itself when the layer keeps one)."""
        if FLOAT32 in self.formats and self.dtype == torch.float32:
            return self.weight_f32
        if self._dense is None:
            if self.values != FLOAT and set(self.formats) & {INT4_DOT, INT8_DOT}:
                dense = self.quantized_weight().dequantize()
            elif INT4 in self.formats:
                dense = dequantize_int4_packed(self.weight_int4, self.scale_zeros_int4, self.out_features,
                                               self.in_features)
            elif INT8 in self.formats:
                dense = self.weight_int8.float() * self.scales_int8.float()[:, None]
            else:
                dense = getattr(self, _BUFFERS[self.small_format][0]).float()
            self._dense = dense.to(self.dtype)
        return self._dense

    def quantized_weight(self) -> QuantizedWeight:
        """The codes and scales of int4 / int8 values, from whichever packed format the layer holds."""
        rows, cols = self.out_features, self.in_features
        if INT4_DOT in self.formats:
            return integer_dot.unpack_int4_dot(self.weight_int4_dot, rows)
        if INT8_DOT in self.formats:
            return integer_dot.unpack_int8_dot(self.weight_int8_dot, self.scale_int8_dot, rows, cols)
        if INT4 in self.formats:
            scale = self.scale_zeros_int4[..., 0].t().float()                               # [N, G]
            minimum = self.scale_zeros_int4[..., 1].t().float() - 8 * scale
            return QuantizedWeight(INT4, unpack_int4_codes(self.weight_int4, rows, cols), scale.contiguous(),
                                   minimum.contiguous())
        if INT8 in self.formats:
            return QuantizedWeight(INT8, self.weight_int8, self.scales_int8.float()[:, None], None)
        if self._held_codes is not None:
            return self._held_codes()
        raise ValueError(f"a layer of {self.values} values held as {'/'.join(self.formats)} has no codes")

    def input_dtype(self, rows: int) -> torch.dtype | None:
        """bfloat16 but where a float32 copy or an integer-dot product (which quantizes float32
        activations itself) makes the product."""
        return None if self.format_for(rows) in (FLOAT32, INT4_DOT, INT8_DOT) else torch.bfloat16

    def keep_weight_in(self, storage: torch.Tensor) -> None:
        """The packed weights stay where they are (a stacked copy of the experts is extra memory)."""
        assert tuple(storage.shape) == (self.out_features, self.in_features)

    def use_column_major(self) -> bool:
        return False

    def weight_bytes(self, rows: int) -> int:
        """Bytes of weight a product over `rows` rows reads."""
        return format_bytes(self.format_for(rows), self.out_features, self.in_features)

    def stored_bytes(self) -> int:
        return sum(format_bytes(fmt, self.out_features, self.in_features) for fmt in self.formats)

    def extra_repr(self) -> str:
        formats = describe_tiers(self.small_format, self.large_format, self.prefill_format)
        return f"in_features={self.in_features}, out_features={self.out_features}, values={self.values}, " \
               f"format={formats}, bias={self.bias is not None}"


def describe_tiers(small: str, large: str, prefill: str) -> str:
    """"int4", or e.g. "int4 (≤ 4 rows) / int4-dot (≤ 64 rows) / bfloat16"."""
    if small == large == prefill:
        return small
    if large == prefill:
        return f"{small} (≤ {SMALL_ROWS} rows) / {large}"
    if small == large:
        return f"{small} (≤ {PREFILL_ROWS} rows) / {prefill}"
    return f"{small} (≤ {SMALL_ROWS} rows) / {large} (≤ {PREFILL_ROWS} rows) / {prefill}"


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_linear(linear: Linear, kind: str) -> Linear:
    """`linear` with its weight quantized to `kind` (int4 or int8), stored in that kernel's format;
    the layer itself when its shape cannot be (it keeps float weights)."""
    if isinstance(linear, QuantizedLinear) or not format_supported(kind, linear.out_features, linear.in_features):
        return linear
    weight = linear.dense_weight()
    return QuantizedLinear.from_weight(quantize(weight, kind), linear.bias, kind, kind, dtype=weight.dtype)


def tied_head_table(model: nn.Module) -> torch.Tensor | None:
    """The embedding table a tied head multiplies by when no Linear of the model holds the head
    (Llama's `head_weight()` without an `lm_head`); None otherwise."""
    if hasattr(model, "head_weight") and not isinstance(getattr(model, "lm_head", None), nn.Module):
        return model.head_weight()
    return None


@torch.no_grad()
def quantize_model(model: nn.Module, kind: str) -> int:
    """Quantize every float Linear of `model` whose shape allows it to `kind` at load (int4: groups
    of 32 columns; int8: per output row), and a tied output head into a Linear of its own (`lm_head`,
    which the family's forward then uses; the embedding table stays float for look-ups). The output
    head takes int8 when the layers take int4 (`quantize.head_kind`). Returns how many matrices were
    quantized."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear) and not isinstance(module, QuantizedLinear):
            quantized = quantize_linear(module, head_kind(kind) if name == "lm_head" else kind)
            if quantized is not module:
                replace_module(model, name, quantized)
                count += 1
    table, head = tied_head_table(model), head_kind(kind)
    if table is not None and format_supported(head, *table.shape):
        model.lm_head = QuantizedLinear.from_weight(quantize(table, head), None, head, head, dtype=table.dtype)
        count += 1
    return count


FUSABLE_FORMATS = (INT4, INT8, BFLOAT16, INT4_DOT, INT8_DOT)
INT4_ROW_BLOCK = 64             # the packed int4 layout's rows per block (model/layers/quantize.py)


def fuse_linears(parts: list[nn.Module]) -> QuantizedLinear | None:
    """One QuantizedLinear whose rows are the parts' rows in order (y = [y_1 | y_2 | …]), sharing
    nothing with them; None when they cannot be joined: not all QuantizedLinears of one input width,
    values and formats, or a float32 format (the float path keeps its own products). Packed int4
    weights of whole row blocks (every part but the last) are concatenated; others are unpacked,
    joined and packed again."""
    first = parts[0]
    if not all(isinstance(p, QuantizedLinear) for p in parts) or any(
            (p.in_features, p.values, p.formats, p.dtype, p.bias is None) !=
            (first.in_features, first.values, first.formats, first.dtype, first.bias is None) for p in parts):
        return None
    if any(fmt not in FUSABLE_FORMATS for fmt in first.formats):
        return None
    bias = None if first.bias is None else torch.cat([p.bias for p in parts])
    layer = QuantizedLinear(first.in_features, sum(p.out_features for p in parts), first.values,
                            first.small_format, first.large_format, bias, first.dtype, first.prefill_format)
    for fmt in first.formats:
        if fmt in (INT4_DOT, INT8_DOT):                    # packed in blocks of 16 features: pack again
            joined = QuantizedLinear.from_weight(QuantizedWeight.cat([p.quantized_weight() for p in parts]), None,
                                                 fmt, fmt)
            for name in _BUFFERS[fmt]:
                layer.register_buffer(name, getattr(joined, name))
        elif fmt == INT4:
            layer.register_buffer("weight_int4", _join_int4([p.weight_int4 for p in parts],
                                                            [p.out_features for p in parts], first.in_features))
            layer.register_buffer("scale_zeros_int4", torch.cat([p.scale_zeros_int4 for p in parts], 1))  # [G, N, 2]
        else:
            for name in _BUFFERS[fmt]:
                layer.register_buffer(name, torch.cat([getattr(p, name) for p in parts]))
    if first.values != FLOAT and all(p.holds_codes for p in parts):
        layer.hold_codes(lambda: QuantizedWeight.cat([p.quantized_weight() for p in parts]))
    return layer


def _join_int4(packed: list[torch.Tensor], rows: list[int], cols: int) -> torch.Tensor:
    """Packed int4 weights [N_i, K/2] → the packed weight of their rows stacked."""
    check_int4_layout()          # the layout known: blocks of 64 rows one after another
    if all(n % INT4_ROW_BLOCK == 0 for n in rows[:-1]):
        return torch.cat(packed)
    codes = torch.cat([unpack_int4_codes(p, n, cols) for p, n in zip(packed, rows)])     # [N, K]
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


@torch.no_grad()
def fuse_quantized_projections(model: nn.Module) -> int:
    """Join the quantized projections of every `FusableProjections` module of `model` that
    `fuse_linears` can (gate|up of the experts, the attention's projections of one input); returns how
    many joined Linears were made. Float Linears are left as they are."""
    count = 0
    for module in list(model.modules()):
        if not isinstance(module, FusableProjections):
            continue
        for fused, parts in module.FUSABLE.items():
            layers = [getattr(module, part, None) for part in parts]
            joined = fuse_linears(layers) if all(isinstance(m, Linear) for m in layers) else None
            if joined is not None:
                module.join(fused, joined)
                count += 1
    return count


def release_held_codes(model: nn.Module) -> int:
    """Let go of every layer a dense-only QuantizedLinear of `model` kept for its codes; returns how
    many did."""
    released = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module._held_codes is not None:
            module._held_codes = None
            released += 1
    return released


def quantized_head(model: nn.Module) -> bool:
    """Whether the model's output head is a QuantizedLinear (its float matrix is then not kept)."""
    return isinstance(getattr(model, "lm_head", None), QuantizedLinear)
