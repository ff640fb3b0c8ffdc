"""GGUF's quantized tensors kept quantized: each block type mapped onto the int4 or int8 codes of
model/layers/quantize.py instead of being dequantized to float.

Exact mappings (the same values gguf's own dequantisation gives, bit for bit, in float32):
- Q4_1 (blocks of 32: fp16 d, fp16 m, 16 bytes of nibbles, w = d·q + m) → int4, scale d, minimum m;
- Q4_0 (fp16 d, nibbles, w = d·(q - 8)) → int4, scale d, minimum -8d.
The kernel then holds scale and zero = m + 8d in bfloat16 (model/layers/quantize.py).
Everything else is dequantized and requantized: Q8_0 (a scale per 32 values) → int8 with a scale per
row; the k-quants and Q5_x → int4 when they carry at most 4 bits a value, else int8.
"""
from __future__ import annotations

import numpy as np
import torch

from model.layers.quantize import GROUP, INT4, INT8, QuantizedWeight, quantize

# the codes each GGUF type is kept as when the file's own precision is kept (`--quantization auto`)
NATIVE_KIND = {"Q4_0": INT4, "Q4_1": INT4, "Q2_K": INT4, "Q3_K": INT4, "Q4_K": INT4,
               "Q5_0": INT8, "Q5_1": INT8, "Q5_K": INT8, "Q6_K": INT8, "Q8_0": INT8}
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}


def _blocks(tensor) -> tuple[np.ndarray, int, int]:
    """The raw blocks [rows, cols/32, bytes per block] of a Q4_0/Q4_1 tensor, and its [rows, cols]."""
    rows, cols = (int(d) for d in reversed(tensor.shape))
    kind = tensor.tensor_type.name
    data = np.asarray(tensor.data).reshape(rows, cols // GROUP, _BLOCK_BYTES[kind])
    return data, rows, cols


def _nibbles(qs: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    """qs [rows, blocks, 16] → codes uint8 [rows, cols]: value j of a block in byte j's low nibble,
    value j + 16 in its high nibble."""
    low, high = qs & 0x0F, qs >> 4
    return torch.from_numpy(np.ascontiguousarray(np.concatenate([low, high], axis=-1))).view(rows, cols)


def _fp16(raw: np.ndarray) -> torch.Tensor:
    """Little-endian fp16 bytes [..., 2] → float32 [...]."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def read_q4(tensor) -> QuantizedWeight:
    """A Q4_0 or Q4_1 tensor as int4 codes, exactly (module docstring)."""
    data, rows, cols = _blocks(tensor)
    scale = _fp16(data[..., 0:2])                                                    # [rows, blocks]
    if tensor.tensor_type.name == "Q4_1":
        minimum, qs = _fp16(data[..., 2:4]), data[..., 4:]
    else:
        minimum, qs = -8 * scale, data[..., 2:]
    return QuantizedWeight(INT4, _nibbles(qs, rows, cols), scale, minimum)


def gguf_quantized(tensor, kind: str, dequantised) -> QuantizedWeight:
    """`tensor` (a quantized GGUF tensor) as `kind` codes: exactly for Q4_0/Q4_1 → int4, else by
    requantizing `dequantised()` (the float32 [rows, cols] matrix)."""
    if kind == INT4 and tensor.tensor_type.name in _BLOCK_BYTES:
        return read_q4(tensor)
    return quantize(dequantised(), kind)


def kept_kind(type_name: str, quantization: str) -> str | None:
    """What a tensor of GGUF type `type_name` is held as under `quantization` ("auto": its nearest
    kernel codes; "int4"/"int8": those; "none": None, dequantized to float)."""
    if quantization == "none" or type_name in FLOAT_TYPES:
        return None
    if quantization == "auto":
        return NATIVE_KIND.get(type_name)
    return quantization
