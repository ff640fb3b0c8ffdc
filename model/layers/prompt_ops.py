"""A prompt chunk's element-wise steps on bfloat16 activations in C (native/prompt_ops.c).

Where a layer's products take bfloat16 inputs for a prompt chunk (`--dtype auto` or `--quantization`
on a CPU with fast bfloat16 products) and its attention runs in bfloat16, the q|k|v product's output
goes straight to RoPE, the cache and the attention, and gate|up's to SwiGLU, without the float32 copy,
the seven PyTorch ops and the casts each costs otherwise (a fifth of a 512-token prefill of the
built-in model). Every function returns None where its kernel does not apply (another device or
dtype, no C compiler, inside torch.compile); the caller then keeps its PyTorch ops.
"""
from __future__ import annotations

import ctypes

import torch

from model.layers import native
from model.layers.cpu_decode_attention import _DTYPES as CACHE_DTYPES

_I64, _I32, _PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


def _kernel(symbol: str, argtypes: list):
    return native.function("prompt_ops", symbol, None, argtypes)


def built() -> bool:
    """Whether the kernels can run here (a C compiler at hand, not inside torch.compile)."""
    return not torch.compiler.is_compiling() and _kernel("prompt_swiglu", [_PTR, _I64, _I64, _PTR]) is not None


def available(x: torch.Tensor) -> bool:
    """Whether the kernels serve activations like x (bfloat16 on a CPU)."""
    return x.is_cpu and x.dtype == torch.bfloat16 and built()


def rope_applies(cache_layer: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rope_qkv` serves this cache layer and these rotation tables (shapes aside)."""
    return (cache_layer.is_cpu and cache_layer.is_contiguous() and cache_layer.dtype in CACHE_DTYPES
            and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous() and built())


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
             cache_layer: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
             with_kv: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """qkv bfloat16 [T, (H + 2KV)·hd] → rotate_half RoPE (cos / sin float32 [T, H + KV, hd]); the
    [K | V] rows written to cache_layer [S, 2·KV·hd] at slot_mapping [T]; returns q bfloat16
    [T, H, hd] and, with `with_kv`, the [K | V] rows as bfloat16 [T, 2·KV·hd] (from the cache's
    rounding), or None where the kernel does not apply."""
    tokens = qkv.shape[0]
    if not (rope_applies(cache_layer, cos, sin) and qkv.is_contiguous() and qkv.dtype == torch.bfloat16
            and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
            and cos.shape == (tokens, heads + kv_heads, head_dim)
            and qkv.shape[1] == (heads + 2 * kv_heads) * head_dim and cache_layer.shape[1] == 2 * kv_heads * head_dim):
        return None
    kernel = _kernel("prompt_rope_qkv", [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I32, _PTR, _PTR])
    q = qkv.new_empty(tokens, heads, head_dim)                                               # [T, H, hd]
    kv = qkv.new_empty(tokens, 2 * kv_heads * head_dim) if with_kv else None                 # [T, 2·KV·hd]
    kernel(qkv.data_ptr(), tokens, heads, kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(),
           slot_mapping.data_ptr(), cache_layer.data_ptr(), CACHE_DTYPES[cache_layer.dtype], q.data_ptr(),
           kv.data_ptr() if kv is not None else None)
    return q, kv


def swiglu(gate_up: torch.Tensor) -> torch.Tensor | None:
    """gate|up bfloat16 [..., 2I] → silu(gate)·up bfloat16 [..., I] (float32 arithmetic, e^-x and the
    division within 2e-4 where the CPU has AVX512-BF16, one rounding),
    or None where the kernel does not apply."""
    if not (available(gate_up) and gate_up.is_contiguous()):
        return None
    inner = gate_up.shape[-1] // 2
    rows = gate_up.numel() // gate_up.shape[-1]
    act = gate_up.new_empty(*gate_up.shape[:-1], inner)                                        # [..., I]
    _kernel("prompt_swiglu", [_PTR, _I64, _I64, _PTR])(gate_up.data_ptr(), rows, inner, act.data_ptr())
    return act


def add_rms_norm(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The residual add and the next RMSNorm: h float32 [T, d] += y bfloat16 [T, d] in place, and
    returns w · h / sqrt(mean(h²) + eps) as bfloat16 [T, d]; None (h untouched) where the kernel
    does not apply."""
    if not (available(y) and y.is_contiguous() and h.dtype == weight.dtype == torch.float32 and h.is_contiguous()
            and h.shape == y.shape and h.dim() == 2 and weight.shape == (h.shape[1],)):
        return None
    out = torch.empty_like(y)                                                                 # [T, d]
    _kernel("prompt_add_rms_norm", [_PTR, _PTR, _I64, _I64, _PTR, ctypes.c_float, _PTR])(
        h.data_ptr(), y.data_ptr(), h.shape[0], h.shape[1], weight.data_ptr(), eps, out.data_ptr())
    return out


def has_tile_attention() -> bool:
    """Whether `causal_attention` runs here (a CPU with AMX-BF16, a compiler that knows it)."""
    fn = native.function("prompt_attention", "prompt_attention_has_amx_bf16", ctypes.c_int, [])
    return fn is not None and bool(fn())


def tile_attention_fits(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether `causal_attention` takes this attention shape (hd 32 or 64: the output in tile registers)."""
    return heads % kv_heads == 0 and head_dim in (32, 64)


def causal_attention(q: torch.Tensor, kv: torch.Tensor, kv_heads: int, scale: float = 1.0,
                     starts: torch.Tensor | None = None) -> torch.Tensor | None:
    """Causal attention of prompts from position 0, each over its own keys, on the CPU's tile unit
    (native/prompt_attention.c): q bfloat16 [T, H, hd], kv bfloat16 [T, 2·KV·hd] = [K | V] → [T, H, hd]
    bfloat16; `starts` int64 [B + 1]: prompt b is rows starts[b] .. starts[b + 1] - 1 (None: one
    prompt). None where it does not run (no AMX-BF16, another head size)."""
    tokens, heads, head_dim = q.shape
    if not (available(q) and q.is_contiguous() and kv.dtype == torch.bfloat16 and kv.is_contiguous()
            and kv.shape == (tokens, 2 * kv_heads * head_dim) and tile_attention_fits(heads, kv_heads, head_dim)
            and has_tile_attention()):
        return None
    if starts is None:
        starts = torch.tensor([0, tokens])
    assert starts.dtype == torch.int64 and int(starts[0]) == 0 and int(starts[-1]) == tokens
    starts = starts.contiguous()
    out = torch.empty_like(q)                                                                  # [T, H, hd]
    kernel = native.function("prompt_attention", "prompt_causal_attention", ctypes.c_int,
                             [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, ctypes.c_float, _PTR])
    if kernel(q.data_ptr(), kv.data_ptr(), starts.data_ptr(), starts.numel() - 1, heads, kv_heads, head_dim, scale,
              out.data_ptr()):
        return None
    return out
