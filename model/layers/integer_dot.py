"""Integer-dot products of int4 / int8 weights (model/layers/native/quant_matmul.c): activations
quantized to int8 per group of 32 columns on the fly, multiplied with AVX512-VNNI byte dot products
(a portable C loop, far slower, where the CPU lacks them), as llama.cpp multiplies its Q4/Q8 blocks.
One pass over the packed weights serves every row of a batch, so 16 rows cost little more than one.

The packed forms (see the C file's header for the arithmetic):
- int4 (input width a multiple of 32): codes uint8 [Np/16, K/32, 4, 64], scale and minimum
  float32 [Np/16, K/32, 16];
- int8: codes + 128 as uint8 [Np/16, Kp/4, 64], scale float32 [Np];
with Np the output width rounded up to 16 and Kp the input width to 32. Inside torch.compile the products are opaque ops
(`customllm::int4_dot_mm`, `customllm::int8_dot_mm`).
"""
from __future__ import annotations

import ctypes

import torch

from model.layers import native
from model.layers.quantize import GROUP, INT4, INT8, QuantizedWeight

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_library = None


def library():
    """The compiled kernels, or None when they cannot be built here (no compiler)."""
    global _library
    if _library is None:
        lib = native.load("quant_matmul")
        if lib is None:
            return None
        lib.q4_matmul.restype = lib.q8_matmul.restype = ctypes.c_int
        lib.q4_matmul.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _I64]
        lib.q8_matmul.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _I64]
        lib.quant_matmul_has_vnni.restype = ctypes.c_int
        lib.quant_matmul_force_portable.argtypes = [ctypes.c_int]
        _library = lib
    return _library


def available() -> bool:
    return library() is not None


def has_vnni() -> bool:
    """Whether the products take the AVX512-VNNI path on this CPU (else the portable loop)."""
    lib = library()
    return bool(lib is not None and lib.quant_matmul_has_vnni())


LANES = 16                     # output features per 512-bit register of int32 sums


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_int4_dot(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [Np/16, G, 4, 64], scale and minimum float32 [Np/16, G, 16]): see the C file."""
    assert weight.kind == INT4
    rows, cols = weight.shape
    n_pad, groups = _round_up(rows, LANES), cols // GROUP
    codes = torch.zeros(n_pad, cols, dtype=torch.uint8)
    codes[:rows] = weight.codes
    # [B, 16 lanes, G, 4 chunks, 2 nibbles, 4 columns] → [B, G, 4 chunks, 16 lanes, 4 columns] per nibble
    split = codes.view(n_pad // LANES, LANES, groups, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
    packed = (split[:, :, :, 0] | (split[:, :, :, 1] << 4)).reshape(n_pad // LANES, groups, 4, 64)
    return packed.contiguous(), _lanes(weight.scale, n_pad), _lanes(weight.minimum, n_pad)


def _lanes(per_group: torch.Tensor, n_pad: int) -> torch.Tensor:
    """float32 [N, G] → [Np/16, G, 16] (padded features 0)."""
    rows, groups = per_group.shape
    padded = torch.zeros(n_pad, groups)
    padded[:rows] = per_group
    return padded.view(n_pad // LANES, LANES, groups).transpose(1, 2).contiguous()


def unpack_int4_dot(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, rows: int) -> QuantizedWeight:
    """The QuantizedWeight `pack_int4_dot` packed (its first `rows` features)."""
    blocks, groups = packed.shape[:2]
    chunks = packed.view(blocks, groups, 4, 1, LANES, 4)
    split = torch.cat([chunks & 15, chunks >> 4], dim=3)                              # [B, G, 4, 2, 16, 4]
    codes = split.permute(0, 4, 1, 2, 3, 5).reshape(blocks * LANES, groups * GROUP)[:rows]

    def per_group(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(blocks * LANES, groups)[:rows].contiguous()
    return QuantizedWeight(INT4, codes.contiguous(), per_group(scale), per_group(minimum))


def pack_int8_dot(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes + 128 uint8 [Np/16, Kp/4, 64], scale float32 [Np]): see the C file."""
    assert weight.kind == INT8
    rows, cols = weight.shape
    n_pad, k_pad = _round_up(rows, LANES), _round_up(cols, GROUP)
    codes = torch.full((n_pad, k_pad), 128, dtype=torch.uint8)
    codes[:rows, :cols] = (weight.codes.to(torch.int16) + 128).to(torch.uint8)
    packed = codes.view(n_pad // LANES, LANES, k_pad // 4, 4).transpose(1, 2).reshape(n_pad // LANES, k_pad // 4, 64)
    scale = torch.zeros(n_pad)
    scale[:rows] = weight.scale[:, 0]
    return packed.contiguous(), scale


def unpack_int8_dot(packed: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> QuantizedWeight:
    blocks, quads = packed.shape[:2]
    codes = packed.view(blocks, quads, LANES, 4).transpose(1, 2).reshape(blocks * LANES, quads * 4)[:rows, :cols]
    return QuantizedWeight(INT8, (codes.to(torch.int16) - 128).to(torch.int8).contiguous(),
                           scale[:rows, None].clone(), None)


def _activations(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def int4_dot_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                features: int) -> torch.Tensor:
    """x [M, K] → x W^T [M, N] float32 for an int4 weight packed by `pack_int4_dot`."""
    if torch.compiler.is_compiling():
        return torch.ops.customllm.int4_dot_mm(x.float(), packed, scale, minimum, features)
    x = _activations(x)
    rows, cols = x.shape
    out = torch.empty(rows, features, dtype=torch.float32)
    if rows and library().q4_matmul(x.data_ptr(), rows, cols, x.stride(0), packed.data_ptr(), scale.data_ptr(),
                                    minimum.data_ptr(), features, packed.shape[1] * GROUP, out.data_ptr(),
                                    out.stride(0)):
        raise MemoryError("int4_dot_mm: no memory for the quantized activations")
    return out


def int8_dot_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, features: int) -> torch.Tensor:
    """x [M, K] → x W^T [M, N] float32 for an int8 weight packed by `pack_int8_dot`."""
    if torch.compiler.is_compiling():
        return torch.ops.customllm.int8_dot_mm(x.float(), codes, scale, features)
    x = _activations(x)
    rows, cols = x.shape
    out = torch.empty(rows, features, dtype=torch.float32)
    if rows and library().q8_matmul(x.data_ptr(), rows, cols, x.stride(0), codes.data_ptr(), scale.data_ptr(),
                                    features, codes.shape[1] * 4, out.data_ptr(), out.stride(0)):
        raise MemoryError("int8_dot_mm: no memory for the quantized activations")
    return out


@torch.library.custom_op("customllm::int4_dot_mm", mutates_args=())
def _int4_dot_mm_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                    features: int) -> torch.Tensor:
    return int4_dot_mm(x, packed, scale, minimum, features)


@_int4_dot_mm_op.register_fake
def _(x, packed, scale, minimum, features):
    return x.new_empty(x.shape[0], features, dtype=torch.float32)


@torch.library.custom_op("customllm::int8_dot_mm", mutates_args=())
def _int8_dot_mm_op(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, features: int) -> torch.Tensor:
    return int8_dot_mm(x, codes, scale, features)


@_int8_dot_mm_op.register_fake
def _(x, codes, scale, features):
    return x.new_empty(x.shape[0], features, dtype=torch.float32)
