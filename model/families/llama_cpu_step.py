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
quantized_linear.py's ≤ SMALL_ROWS and ≤ PREFILL_ROWS tiers) held in an integer-dot format (quantized
ones the kernel choice put in PyTorch's int4 / int8 kernels are moved there first); other
steps (prompt chunks, tiers held otherwise, torch.compile) keep the layer-by-layer path. The Python
half the families share is model/layers/cpu_decode_step.py.
"""
from __future__ import annotations

import ctypes

import torch

from model.layers import integer_dot, native
from model.layers.cpu_decode_attention import _gqa_offsets, cpu_paged_gqa_decode
from model.layers.cpu_decode_step import I64, PTR, CpuDecodeStep, DotWeight, install, step_argtypes

class LlamaLayer(ctypes.Structure):
    _fields_ = [("input_norm", PTR), ("post_norm", PTR), ("qkv", DotWeight), ("o", DotWeight),
                ("gate_up", DotWeight), ("down", DotWeight), ("cache", PTR)]


class LlamaShape(ctypes.Structure):
    _fields_ = [("hidden", I64), ("heads", I64), ("kv_heads", I64), ("head_dim", I64), ("intermediate", I64),
                ("eps", ctypes.c_float), ("cache_dtype", ctypes.c_int32), ("a_off", PTR), ("b_off", PTR),
                ("v_off", PTR)]


def force_portable_products(portable: bool) -> None:
    """Tests: the step's products through the portable loop (its library holds its own copy of the
    product kernels, and so its own switch), or the CPU's best again."""
    force = native.function("llama_decode_step", "quant_matmul_force_path", ctypes.c_int, [ctypes.c_int])
    force(0 if portable else len(integer_dot.PATHS) - 1)


def _kernel():
    """The C entry point (looked up once, by native.function), or None when it cannot be built here."""
    return native.function("llama_decode_step", "llama_decode_layers", ctypes.c_int, step_argtypes(LlamaShape, LlamaLayer))


class LlamaCpuDecodeStep(CpuDecodeStep):
    """The C step of one Llama model (see CpuDecodeStep)."""

    def __init__(self, model):
        cfg = model.config
        self.model = model
        offsets = _gqa_offsets(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        shape = LlamaShape(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                           cfg.rms_norm_eps, 0, *(offset.data_ptr() for offset in offsets))
        super().__init__(_kernel(), shape, keep_alive=list(offsets))

    def layers(self, rows: int):
        layers = []
        for layer in self.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            weights = [self.weight(linear, rows) for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                                mlp.down_proj)]
            if any(w is None for w in weights):
                return None
            layers.append(LlamaLayer(layer.input_layernorm.weight.data_ptr(),
                                     layer.post_attention_layernorm.weight.data_ptr(), *weights, None))
        return (LlamaLayer * len(layers))(*layers)


def _step_linears(model) -> list:
    return [linear for layer in model.model.layers for linear in (
        layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]


def use_cpu_decode_step(model, choice: tuple | None = None) -> bool:
    """Give a Llama-family model on the CPU its C decode step (`model.cpu_decode_step`) when it
    qualifies (see the module docstring); returns whether it did. `choice`: (mode, Timings, cache
    dtype) of the kernel choice, to time tiers it held in float formats both ways
    (cpu_decode_step.install)."""
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
    return install(model, _step_linears, LlamaCpuDecodeStep, choice)
