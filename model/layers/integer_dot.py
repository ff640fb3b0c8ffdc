"""Integer-dot products of int4 / int8 weights (model/layers/native/quant_matmul.c): activations
quantized on the fly per group of 32 columns to two int8 digits (~15 bits; llama.cpp, which
multiplies its Q4/Q8 blocks this way, uses one), multiplied with AVX512-VNNI byte dot products, or,
for batches of `amx_min_rows()` rows or more where the CPU has them, with AMX tiles (the same integer
sums); a portable C loop, far slower, where the CPU lacks both. One pass over the packed weights
serves every row of a batch. int8 weights on the tiles take activations with one scale per row
instead (two digits relative to the row's largest value): their integer sums then run over whole
rows in the tiles, with no scaling per group, and the product is bound by the weights' bytes.

The packed forms (see the C file's header for the arithmetic):
- int4 (input width a multiple of 32): uint8 [Np/64, K/32, R], one record per (64 features, group
  of 32 columns): codes, then scales and minimums, float16 (R = 1280) when every one is a float16
  value (GGUF's Q4_0 / Q4_1 blocks, `--quantization int4`), else float32 (R = 1536);
- int8: uint8 [Np/64, Kp/32, 2048] (codes + 128), scale float32 [Np];
with Np the output width rounded up to 64 and Kp the input width to 32. Inside torch.compile the products are opaque ops
(`customllm::int4_dot_mm`, `customllm::int8_dot_mm`).
"""
from __future__ import annotations

import ctypes

import torch

from model.layers import native
from model.layers.quantize import GROUP, INT4, INT8, QuantizedWeight, exact_in_half

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
        lib.q4_matmul.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, ctypes.c_int]
        lib.q8_matmul.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _I64]
        lib.quant_matmul_has_vnni.restype = lib.quant_matmul_has_amx.restype = ctypes.c_int
        lib.quant_matmul_amx_min_rows.restype = ctypes.c_int
        lib.quant_matmul_force_path.restype = ctypes.c_int
        lib.quant_matmul_force_path.argtypes = [ctypes.c_int]
        _library = lib
    return _library


def available() -> bool:
    return library() is not None


def has_vnni() -> bool:
    """Whether the products take the AVX512-VNNI path on this CPU (else the portable loop)."""
    lib = library()
    return bool(lib is not None and lib.quant_matmul_has_vnni())


def has_amx() -> bool:
    """Whether batches of rows take the AMX tiles on this CPU (Intel Sapphire Rapids and later)."""
    lib = library()
    return bool(lib is not None and lib.quant_matmul_has_amx())


PATHS = ("portable", "vnni", "amx")     # the C side's paths, slowest first


def amx_min_rows() -> int:
    """Rows from which a product takes the AMX tiles where the CPU has them (the C side's AMX_MIN_ROWS)."""
    return library().quant_matmul_amx_min_rows()


def force_path(highest: str) -> str:
    """Tests: products through the best path this CPU allows, at most `highest` (one of PATHS);
    returns the one taken."""
    return PATHS[library().quant_matmul_force_path(PATHS.index(highest))]


LANES = 16                     # output features per 512-bit register of int32 sums
TILE = 64                      # output features per record: 4 blocks of LANES


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


RECORD_HALF, RECORD_FLOAT = 1280, 1536   # int4 record bytes with float16 / float32 scales and minimums


def pack_int4_dot(weight: QuantizedWeight) -> torch.Tensor:
    """uint8 [Np/64, G, R]: per (tile, group) the codes [4 blocks][4 chunks][64], then scale and
    minimum [4 blocks][16] (see the C file): float16 (R = 1280) when they all are float16 values,
    float32 (R = 1536) otherwise."""
    assert weight.kind == INT4
    rows, cols = weight.shape
    n_pad, groups = _round_up(rows, TILE), cols // GROUP
    codes = torch.zeros(n_pad, cols, dtype=torch.uint8)
    codes[:rows] = weight.codes
    # [T, 4 blocks, 16 lanes, G, 4 chunks, 2 nibbles, 4 columns] → [T, G, blocks, chunks, lanes, columns]
    split = codes.view(n_pad // TILE, 4, LANES, groups, 4, 2, 4).permute(0, 3, 1, 4, 5, 2, 6)
    nibbles = (split[..., 0, :, :] | (split[..., 1, :, :] << 4)).reshape(n_pad // TILE, groups, 1024)
    held = bool(exact_in_half(weight.scale).all() and exact_in_half(weight.minimum).all())
    dtype = torch.float16 if held else torch.float32
    return torch.cat([nibbles, _tile_floats(weight.scale, n_pad, dtype), _tile_floats(weight.minimum, n_pad, dtype)],
                     dim=2)


def int4_half_scales(packed: torch.Tensor) -> bool:
    """Whether a packed int4 weight's records hold float16 scales (else float32)."""
    return packed.shape[2] == RECORD_HALF


def _tile_floats(per_group: torch.Tensor, n_pad: int, dtype: torch.dtype) -> torch.Tensor:
    """float32 [N, G] → its bytes in `dtype` as uint8 [Np/64, G, 64 · size] ([4 blocks][16 lanes] per group)."""
    rows, groups = per_group.shape
    padded = torch.zeros(n_pad, groups, dtype=dtype)
    padded[:rows] = per_group
    tiled = padded.view(n_pad // TILE, TILE, groups).transpose(1, 2).contiguous()      # [T, G, 64]
    return tiled.view(torch.uint8)


def unpack_int4_dot(packed: torch.Tensor, rows: int) -> QuantizedWeight:
    """The QuantizedWeight `pack_int4_dot` packed (its first `rows` features)."""
    tiles, groups = packed.shape[:2]
    chunks = packed[..., :1024].reshape(tiles, groups, 4, 4, 1, LANES, 4)            # [T, G, b, i, 1, l, j]
    split = torch.cat([chunks & 15, chunks >> 4], dim=4)                              # [T, G, b, i, 2, l, j]
    codes = split.permute(0, 2, 5, 1, 3, 4, 6).reshape(tiles * TILE, groups * GROUP)[:rows]
    dtype = torch.float16 if int4_half_scales(packed) else torch.float32
    width = TILE * dtype.itemsize

    def per_group(start: int) -> torch.Tensor:
        floats = packed[..., start:start + width].contiguous().view(dtype).float()   # [T, G, 64]
        return floats.transpose(1, 2).reshape(tiles * TILE, groups)[:rows].contiguous()
    return QuantizedWeight(INT4, codes.contiguous(), per_group(1024), per_group(1024 + width))


def pack_int8_dot(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [Np/64, Kp/32, 2048]: codes + 128 per (tile, group) as [8 quads][4 blocks][64],
    scale float32 [Np]): see the C file."""
    assert weight.kind == INT8
    rows, cols = weight.shape
    n_pad, k_pad = _round_up(rows, TILE), _round_up(cols, GROUP)
    codes = torch.full((n_pad, k_pad), 128, dtype=torch.uint8)
    codes[:rows, :cols] = (weight.codes.to(torch.int16) + 128).to(torch.uint8)
    # [T, 4 blocks, 16 lanes, G, 8 quads, 4 columns] → [T, G, quads, blocks, lanes, columns]
    packed = codes.view(n_pad // TILE, 4, LANES, k_pad // GROUP, 8, 4).permute(0, 3, 4, 1, 2, 5)
    scale = torch.zeros(n_pad)
    scale[:rows] = weight.scale[:, 0]
    return packed.reshape(n_pad // TILE, k_pad // GROUP, 2048).contiguous(), scale


def unpack_int8_dot(packed: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> QuantizedWeight:
    tiles, groups = packed.shape[:2]
    codes = packed.view(tiles, groups, 8, 4, LANES, 4).permute(0, 3, 4, 1, 2, 5)
    codes = codes.reshape(tiles * TILE, groups * GROUP)[:rows, :cols]
    return QuantizedWeight(INT8, (codes.to(torch.int16) - 128).to(torch.int8).contiguous(),
                           scale[:rows, None].clone(), None)


def _activations(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def int4_dot_mm(x: torch.Tensor, packed: torch.Tensor, features: int) -> torch.Tensor:
    """x [M, K] → x W^T [M, N] float32 for an int4 weight packed by `pack_int4_dot`."""
    if torch.compiler.is_compiling():
        return torch.ops.customllm.int4_dot_mm(x.float(), packed, features)
    x = _activations(x)
    rows, cols = x.shape
    out = torch.empty(rows, features, dtype=torch.float32)
    if rows and library().q4_matmul(x.data_ptr(), rows, cols, x.stride(0), packed.data_ptr(), features,
                                    packed.shape[1] * GROUP, out.data_ptr(), out.stride(0),
                                    int(int4_half_scales(packed))):
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
                                    features, codes.shape[1] * GROUP, out.data_ptr(), out.stride(0)):
        raise MemoryError("int8_dot_mm: no memory for the quantized activations")
    return out


@torch.library.custom_op("customllm::int4_dot_mm", mutates_args=())
def _int4_dot_mm_op(x: torch.Tensor, packed: torch.Tensor, features: int) -> torch.Tensor:
    return int4_dot_mm(x, packed, features)


@_int4_dot_mm_op.register_fake
def _(x, packed, features):
    return x.new_empty(x.shape[0], features, dtype=torch.float32)


@torch.library.custom_op("customllm::int8_dot_mm", mutates_args=())
def _int8_dot_mm_op(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, features: int) -> torch.Tensor:
    return int8_dot_mm(x, codes, scale, features)


@_int8_dot_mm_op.register_fake
def _(x, codes, scale, features):
    return x.new_empty(x.shape[0], features, dtype=torch.float32)
