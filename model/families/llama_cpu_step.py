"""The Llama family's decode steps on the CPU in one C call (model/layers/native/llama_decode_step.c):
every layer's norm, products, RoPE, cache write, paged attention, SwiGLU and residuals, with the
weights in the integer-dot formats (model/layers/integer_dot.py).

Layer by layer, a decode step of the built-in model is ~60 PyTorch ops per layer and the Python
between them: at one row, more time than its matrix products. The C step runs the same kernels (the
products, the paged attention and the norm are the very functions the layer-by-layer path calls)
and computes the rest (RoPE, SwiGLU, residuals) in plain loops, so its results match that path up to
the rounding of those few element-wise ops.

`use_cpu_decode_step(model)` turns it on where every layer qualifies: float32 activations, decode
attention through the CPU kernel, and every projection of a row-count tier (model/layers/
quantized_linear.py's ≤ SMALL_ROWS and ≤ PREFILL_ROWS tiers) held in an integer-dot format; other
steps (prompt chunks, tiers held otherwise, torch.compile) keep the layer-by-layer path.
"""
from __future__ import annotations

import ctypes
import logging

import torch

from model.cache.batch import PagedBatch
from model.layers import native
from model.layers.cpu_decode_attention import _DTYPES as CACHE_DTYPES
from model.layers.cpu_decode_attention import _gqa_offsets, cpu_paged_gqa_decode
from model.layers.quantize import GROUP
from model.layers.quantized_linear import INT4_DOT, INT8_DOT, PREFILL_ROWS, SMALL_ROWS, QuantizedLinear

log = logging.getLogger("customllm.model")

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class DotWeight(ctypes.Structure):
    _fields_ = [("bits", _I64), ("packed", _PTR), ("scale", _PTR), ("out_features", _I64), ("in_padded", _I64)]


class LlamaLayer(ctypes.Structure):
    _fields_ = [("input_norm", _PTR), ("post_norm", _PTR), ("qkv", DotWeight), ("o", DotWeight),
                ("gate_up", DotWeight), ("down", DotWeight), ("cache", _PTR)]


class LlamaShape(ctypes.Structure):
    _fields_ = [("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64), ("intermediate", _I64),
                ("eps", ctypes.c_float), ("cache_dtype", ctypes.c_int32), ("a_off", _PTR), ("b_off", _PTR),
                ("v_off", _PTR)]


_function: list = []           # [the C entry point, or None when it cannot be built here]


def force_portable_products(portable: bool) -> None:
    """Tests: the step's products through the portable loop (its library holds its own copy of the
    product kernels, and so its own switch), or the CPU's best again."""
    native.function("llama_decode_step", "quant_matmul_force_portable", None, [ctypes.c_int])(int(portable))


def _kernel():
    if not _function:
        _function.append(native.function(
            "llama_decode_step", "llama_decode_layers", ctypes.c_int,
            [_PTR, _I64, ctypes.POINTER(LlamaShape), ctypes.POINTER(LlamaLayer), _I64, _PTR, _PTR, _PTR, _PTR, _I64,
             _PTR, _I64, _I64]))
    return _function[0]


def _dot_weight(linear, rows: int) -> DotWeight | None:
    """The packed weight a product over `rows` rows uses, when it is an integer-dot one."""
    if not isinstance(linear, QuantizedLinear) or linear.bias is not None:
        return None
    fmt = linear.format_for(rows)
    if fmt == INT4_DOT:
        packed = linear.weight_int4_dot
        return DotWeight(4, packed.data_ptr(), None, linear.out_features, packed.shape[1] * GROUP)
    if fmt == INT8_DOT:
        packed = linear.weight_int8_dot
        return DotWeight(8, packed.data_ptr(), linear.scale_int8_dot.data_ptr(), linear.out_features,
                         packed.shape[1] * GROUP)
    return None


class LlamaCpuDecodeStep:
    """The C step of one model: its layers' weights as C descriptors for each row-count tier whose
    projections are all integer-dot (None for the others), rebuilt against a cache when the cache's
    tensors change."""

    def __init__(self, model):
        cfg = model.config
        self.model = model
        self.offsets = _gqa_offsets(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)          # kept alive
        self.shape = LlamaShape(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                cfg.intermediate_size, cfg.rms_norm_eps, 0,
                                *(offset.data_ptr() for offset in self.offsets))
        self.tiers = {rows: self._layers(rows) for rows in (SMALL_ROWS, PREFILL_ROWS)}
        self._cache_key: tuple | None = None
        self._cache_dtype: torch.dtype | None = None

    def _layers(self, rows: int):
        """ctypes array of LlamaLayer for steps of up to `rows` rows (cache pointers filled per cache),
        or None when some projection of that tier is not integer-dot."""
        layers = []
        for layer in self.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            weights = [_dot_weight(linear, rows) for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                                 mlp.down_proj)]
            if any(w is None for w in weights):
                return None
            layers.append(LlamaLayer(layer.input_layernorm.weight.data_ptr(),
                                     layer.post_attention_layernorm.weight.data_ptr(), *weights, None))
        return (LlamaLayer * len(layers))(*layers)

    def _bind_cache(self, cache: list[torch.Tensor]) -> bool:
        key = tuple(layer.data_ptr() for layer in cache)
        if key == self._cache_key:
            return True
        dtype = cache[0].dtype
        if dtype not in CACHE_DTYPES or not all(layer.is_contiguous() and layer.dtype == dtype for layer in cache):
            return False
        for layers in self.tiers.values():
            if layers is not None:
                for layer, pointer in zip(layers, key):
                    layer.cache = pointer
        self.shape.cache_dtype = CACHE_DTYPES[dtype]
        self._cache_key = key
        return True

    def run(self, h: torch.Tensor, rope, batch: PagedBatch, cache: list[torch.Tensor]) -> bool:
        """Every layer of a decode-only step over h [T, d] (updated in place); False, touching
        nothing, when this step is not one the C step takes (then the caller runs the layers)."""
        rows = h.shape[0]
        layers = self.tiers[SMALL_ROWS] if rows <= SMALL_ROWS else self.tiers[PREFILL_ROWS] if rows <= PREFILL_ROWS \
            else None
        if layers is None or not batch.is_decode_only or torch.compiler.is_compiling() or not self._bind_cache(cache):
            return False
        tables, lens = batch.block_tables, batch.context_lens
        if not (tables.is_contiguous() and lens.is_contiguous() and h.is_contiguous()):
            return False
        status = _kernel()(h.data_ptr(), rows, ctypes.byref(self.shape), layers, len(layers), rope.cos.data_ptr(),
                           rope.sin.data_ptr(), batch.slot_mapping.data_ptr(), tables.data_ptr(), tables.shape[1],
                           lens.data_ptr(), batch.block_size, -1 if batch.window is None else batch.window)
        if status:
            raise MemoryError("llama_decode_layers: no memory for a step's scratch rows")
        return True


def use_cpu_decode_step(model) -> bool:
    """Give a Llama-family model on the CPU its C decode step (`model.cpu_decode_step`) when it
    qualifies (see the module docstring); returns whether it did."""
    from model.layers.norms import RMSNorm
    if getattr(model.config, "family", None) != "llama" or _kernel() is None:
        return False
    decoder = model.model
    if decoder.embed_tokens.weight.device.type != "cpu" or decoder.embed_tokens.weight.dtype != torch.float32:
        return False
    for layer in decoder.layers:
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if layer.self_attn.decode_kernel is not cpu_paged_gqa_decode or not all(
                isinstance(n, RMSNorm) and n.weight.dtype == torch.float32 and n.weight.is_contiguous() for n in norms):
            return False
    step = LlamaCpuDecodeStep(model)
    if all(layers is None for layers in step.tiers.values()):
        return False
    model.cpu_decode_step = step
    tiers = [f"≤ {rows} rows" for rows, layers in step.tiers.items() if layers is not None]
    log.info("decode steps of %s: every layer in one C call (integer-dot products)", " and ".join(tiers))
    return True
