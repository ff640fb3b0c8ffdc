"""Quantized weight values, and the packed layouts of PyTorch's CPU kernels that multiply by them.

A `QuantizedWeight` is a matrix [out, in] held as integer codes and float32 scales, before any
kernel packs it:
- int4, groups of 32 columns: codes 0..15, `w[n, k] = scale[n, g] · code[n, k] + minimum[n, g]`
  with g = k // 32 (GGUF's Q4_1 form; Q4_0's `d · (code - 8)` is minimum = -8d);
- int8, one scale per output row: codes -127..127, `w[n, k] = scale[n] · code[n, k]`.

The kernels (`torch.ops.aten._weight_int4pack_mm_for_cpu`, group 32, and `_weight_int8pack_mm`) run
with bfloat16 activations and take their scales in bfloat16; the int4 kernel computes
`(code - 8) · scale + zero`, so a packed int4 weight stores zero = minimum + 8 · scale. Quantizing
a float matrix here picks codes against the bfloat16-rounded scales the kernel will use.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

GROUP = 32                     # int4 columns per scale (the kernel's group size, GGUF's block size)
INT4, INT8 = "int4", "int8"


@dataclass
class QuantizedWeight:
    """Integer codes and float32 scales of a matrix [out, in] (see the module docstring)."""

    kind: str                          # "int4" | "int8"
    codes: torch.Tensor                # int4: uint8 [N, K] in 0..15; int8: int8 [N, K]
    scale: torch.Tensor                # int4: float32 [N, K/32]; int8: float32 [N, 1]
    minimum: torch.Tensor | None       # int4: float32 [N, K/32]; int8: None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The matrix [N, K] the codes stand for (computed in float32: for GGUF's Q4_0/Q4_1/Q8_0
        blocks the very values gguf's own dequantisation gives)."""
        rows, cols = self.shape
        if self.kind == INT8:
            return (self.codes.float() * self.scale).to(dtype)                        # [N, K]
        codes = self.codes.float().view(rows, cols // GROUP, GROUP)                    # [N, G, 32]
        return (codes * self.scale[..., None] + self.minimum[..., None]).view(rows, cols).to(dtype)

    def select_rows(self, index: torch.Tensor) -> "QuantizedWeight":
        """The rows `index` (a permutation or subset of 0..N-1), codes and scales alike."""
        return QuantizedWeight(self.kind, self.codes[index], self.scale[index],
                               None if self.minimum is None else self.minimum[index])

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Row-wise concatenation (fused q/k/v, gate/up) of weights of one kind."""
        kinds = {p.kind for p in parts}
        assert len(kinds) == 1, f"cannot join {sorted(kinds)} weights"
        minimum = None if parts[0].minimum is None else torch.cat([p.minimum for p in parts])
        return QuantizedWeight(parts[0].kind, torch.cat([p.codes for p in parts]),
                               torch.cat([p.scale for p in parts]), minimum)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to bfloat16 (kept in float32)."""
    return x.to(torch.bfloat16).float()


def exact_in_half(values: torch.Tensor) -> torch.Tensor:
    """Which float32 values float16 holds exactly as normal numbers (or zero): bool, same shape."""
    magnitude = values.abs()
    normal = (magnitude == 0) | ((magnitude >= 2.0 ** -14) & (magnitude <= 65504.0))
    return normal & (values.half().float() == values)


def _half_minimum(zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`zero` (bfloat16 values) moved, where that takes at most one float16 step at the minimum's
    magnitude, to a multiple of that step still in bfloat16, so that minimum = zero - 8·scale is a
    float16 value too
    (the integer-dot kernels then hold scales and minimums in float16: 5 bits a weight, not 6).
    Groups where no such zero is near keep theirs."""
    _, exponent = torch.frexp(zero.abs() + 8 * scale)                                 # |minimum| < 2^exponent
    step = torch.ldexp(torch.ones_like(scale), exponent - 11)                         # float16's step there
    snapped = _bf16(torch.round(zero / step) * step)
    minimum = snapped - 8 * scale
    return torch.where(exact_in_half(minimum) & ((snapped - zero).abs() <= step), snapped, zero)


@torch.no_grad()
def quantize_int4(weight: torch.Tensor) -> QuantizedWeight:
    """Asymmetric int4 per group of 32 columns: each group's [min, max] over the 16 codes. Scale and
    zero are first rounded to bfloat16 (what the kernel multiplies by), then each code is the
    nearest one under those rounded values."""
    rows, cols = weight.shape
    assert cols % GROUP == 0, f"int4 needs a multiple of {GROUP} input features, not {cols}"
    groups = weight.float().reshape(rows, cols // GROUP, GROUP)                       # [N, G, 32]
    low, high = groups.amin(-1), groups.amax(-1)                                      # [N, G]
    scale = _bf16((high - low) / 15)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))                     # constant group
    zero = _half_minimum(_bf16(low + 8 * scale), scale)                               # kernel's zero point
    minimum = zero - 8 * scale
    codes = torch.round((groups - minimum[..., None]) / scale[..., None]).clamp_(0, 15)
    return QuantizedWeight(INT4, codes.to(torch.uint8).view(rows, cols), scale, minimum)


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8 per output row: scale = max|w| / 127 (rounded to bfloat16 first)."""
    w = weight.float()
    scale = _bf16(w.abs().amax(-1, keepdim=True) / 127)                               # [N, 1]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(INT8, codes, scale, None)


def head_kind(kind: str) -> str:
    """The codes of an output head when the layers are `kind`: never below int8. The logits are
    sensitive: an int4 head (from its Q8_0) raised the built-in model's perplexity on
    tests/data/perplexity_text.txt by 8 %, an int8 one by less than 0.1 % (docs/benchmarks.md)."""
    return INT8 if kind == INT4 else kind


def quantize(weight: torch.Tensor, kind: str) -> QuantizedWeight:
    """`weight` [N, K] (any float dtype) as `kind` codes."""
    if kind == INT4:
        return quantize_int4(weight)
    if kind == INT8:
        return quantize_int8(weight)
    raise ValueError(f"unknown quantization {kind!r}: choose int4 or int8")


# ---- the CPU kernels' packed forms ------------------------------------------------------------------

def pack_int4(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K/2] in `_convert_weight_to_int4pack_for_cpu`'s layout, scale_zeros bfloat16
    [K/32, N, 2] holding (scale, minimum + 8·scale)) for `_weight_int4pack_mm_for_cpu`."""
    assert weight.kind == INT4
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32), 1)
    zero = weight.minimum + 8 * weight.scale
    scale_zeros = torch.stack([weight.scale, zero], dim=-1).transpose(0, 1)          # [G, N, 2]
    return packed, scale_zeros.to(torch.bfloat16).contiguous()


def unpack_int4_codes(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The codes uint8 [N, K] of a packed int4 weight. The layout (this torch's): rows in blocks of
    64, each block's bytes ordered [K, 32] with row r in the low nibble and row r + 32 in the high
    one; the last N % 64 rows as [K, tail/2], rows 2j and 2j + 1 in the low and high nibble."""
    check_int4_layout()
    return _unpack(packed, rows, cols)


def _unpack(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    flat = packed.reshape(-1)
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    full = rows // 64 * 64
    if full:
        block = flat[: full * cols // 2].view(full // 64, cols, 32)                    # [B, K, 32]
        both = torch.cat([block & 15, block >> 4], dim=2)                              # [B, K, 64]
        codes[:full] = both.permute(0, 2, 1).reshape(full, cols)
    tail = rows - full
    if tail:
        block = flat[full * cols // 2:].view(cols, tail // 2)                          # [K, tail/2]
        codes[full:] = torch.stack([block & 15, block >> 4], dim=2).reshape(cols, tail).t()
    return codes


@lru_cache(maxsize=1)
def check_int4_layout() -> None:
    """Once per process: this torch packs the way `_unpack` reads (a torch that changed its layout
    is refused with a clear error rather than giving wrong dense weights or wrongly joined ones)."""
    probe = torch.randint(0, 16, (80, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    if not torch.equal(_unpack(packed, 80, 64).to(torch.int32), probe):
        raise RuntimeError(f"torch {torch.__version__} packs int4 weights in a layout model/layers/quantize.py "
                           "does not know; dense_weight() of an int4 Linear cannot be computed")


def dequantize_int4_packed(packed: torch.Tensor, scale_zeros: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The float32 matrix [N, K] a packed int4 weight multiplies by: (code - 8) · scale + zero."""
    codes = unpack_int4_codes(packed, rows, cols).float().view(rows, cols // GROUP, GROUP)   # [N, G, 32]
    scale = scale_zeros[..., 0].t().float()[..., None]                                         # [N, G, 1]
    zero = scale_zeros[..., 1].t().float()[..., None]
    return ((codes - 8) * scale + zero).view(rows, cols)


def pack_int8(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [N, K], scales bfloat16 [N]) for `_weight_int8pack_mm`."""
    assert weight.kind == INT8
    return weight.codes.contiguous(), weight.scale[:, 0].to(torch.bfloat16).contiguous()
