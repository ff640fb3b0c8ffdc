"""The CustomLLM family's decode steps on the CPU in one C call (model/layers/native/
custom_llm_decode_step.c): every layer's norms, projections, RoPE, latent cache write, absorbed
attention, MoE routing and experts, and residuals, with the projections and experts in the
integer-dot formats (model/layers/integer_dot.py).

Layer by layer, a decode step of the 973M model is ~100 PyTorch ops per layer (the MoE's routing
alone reads the routes to the host) and the Python between them. The C step runs the same kernels
(the products, the paged latent attention, the norm) and the rest (RoPE, the absorbed W_uk / W_uv
products, routing, SwiGLU, residuals) in plain loops, keeping the order of the layer path's sums,
so its results match that path up to the rounding of those element-wise ops.

`use_cpu_decode_step(model)` turns it on where every layer qualifies: float32 activations, decode
attention through the CPU kernel, the projections of one input joined (`input_proj`, `query_proj`,
each expert's `gate_up_proj`: what loading does to quantized weights), and in a row-count tier every
projection and expert held in an integer-dot format (the router and W_uk / W_uv stay float32);
quantized ones the kernel choice put in PyTorch's int4 / int8 kernels for decode steps are moved
to integer-dot first (`hold_in_dot_formats`), and parts that could not be joined for differing
formats are joined then.
"""
from __future__ import annotations

import ctypes

import torch

from model.layers import native
from model.layers.cpu_decode_attention import _mla_offsets, cpu_paged_mla_decode
from model.layers.cpu_decode_step import I64, PTR, CpuDecodeStep, DotWeight, install, step_argtypes

class CustomLayer(ctypes.Structure):
    _fields_ = [("input_norm", PTR), ("post_norm", PTR), ("input_proj", DotWeight), ("query_proj", DotWeight),
                ("w_uk", PTR), ("w_uv", PTR), ("o", DotWeight), ("router", PTR), ("routing_bias", PTR),
                ("gate_up", ctypes.POINTER(DotWeight)), ("down", ctypes.POINTER(DotWeight)), ("cache", PTR)]


class CustomShape(ctypes.Structure):
    _fields_ = [("hidden", I64), ("heads", I64), ("head_dim", I64), ("rope_dim", I64), ("latent", I64),
                ("expert_hidden", I64), ("shared_experts", I64), ("routed_experts", I64), ("top_k", I64),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("cache_dtype", ctypes.c_int32),
                ("a_off", PTR), ("b_off", PTR), ("v_off", PTR)]


def _kernel():
    """The C entry point (looked up once, by native.function), or None when it cannot be built here."""
    return native.function("custom_llm_decode_step", "custom_llm_decode_layers", ctypes.c_int, step_argtypes(CustomShape, CustomLayer))


def _joined(module, fused: str):
    """The joined Linear of `fused` (the parts' rows in order), or None when the parts stay apart."""
    return getattr(module, fused) if module.fused_parts(fused) else None


def _step_linears(model):
    """Every projection the C step multiplies: each joined group as one, parts not joined one by one."""
    for layer in model.decoder_layers:
        attn, moe = layer.self_attn, layer.mlp.moe
        for module, fused in [(attn, "input_proj"), (attn, "query_proj"),
                              *((e, "gate_up_proj") for e in [*moe.shared_experts, *moe.routed_experts])]:
            joined = _joined(module, fused)
            yield from [joined] if joined is not None else (getattr(module, part) for part in module.FUSABLE[fused])
        yield attn.o_proj
        yield from (e.down_proj for e in [*moe.shared_experts, *moe.routed_experts])


class CustomLLMCpuDecodeStep(CpuDecodeStep):
    """The C step of one CustomLLM model (see CpuDecodeStep). W_uk, W_uv and the routers are float32
    copies made here (the absorbed attention's dense per-head matrices; a router's weight in
    row-major order)."""

    def __init__(self, model):
        cfg = model.config
        self.model = model
        offsets = _mla_offsets(cfg.num_heads, cfg.latent_dim, cfg.rope_dim)
        self.dense = []
        for layer in model.decoder_layers:
            attn, moe = layer.self_attn, layer.mlp.moe
            self.dense.append(tuple(t.detach().float().contiguous() for t in (
                attn.k_proj_u.dense_weight(), attn.v_proj_u.dense_weight(), moe.router.dense_weight(),
                moe.routing_bias)))
        shape = CustomShape(cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.rope_dim, cfg.latent_dim,
                            cfg.expert_hidden, cfg.num_shared_experts, cfg.num_routed_experts, cfg.top_k_experts,
                            cfg.rms_norm_eps, model.decoder_layers[0].self_attn.scale, 0,
                            *(offset.data_ptr() for offset in offsets))
        self.expert_arrays: list = []          # the per-layer DotWeight arrays the descriptors point at
        super().__init__(_kernel(), shape, keep_alive=list(offsets))

    def layers(self, rows: int):
        layers = []
        for layer, (w_uk, w_uv, router, bias) in zip(self.model.decoder_layers, self.dense):
            attn, moe = layer.self_attn, layer.mlp.moe
            experts = [*moe.shared_experts, *moe.routed_experts]
            projections = [_joined(attn, "input_proj"), _joined(attn, "query_proj"), attn.o_proj]
            weights = [self.weight(p, rows) for p in projections]
            gate_up = [self.weight(_joined(e, "gate_up_proj"), rows) for e in experts]
            down = [self.weight(e.down_proj, rows) for e in experts]
            if any(w is None for w in [*weights, *gate_up, *down]):
                return None
            gate_up_array, down_array = (DotWeight * len(experts))(*gate_up), (DotWeight * len(experts))(*down)
            self.expert_arrays += [gate_up_array, down_array]
            layers.append(CustomLayer(layer.input_norm.weight.data_ptr(), layer.post_attn_norm.weight.data_ptr(),
                                      weights[0], weights[1], w_uk.data_ptr(), w_uv.data_ptr(), weights[2],
                                      router.data_ptr(), bias.data_ptr(), gate_up_array, down_array, None))
        return (CustomLayer * len(layers))(*layers)


def use_cpu_decode_step(model, choice: tuple | None = None) -> bool:
    """Give a CustomLLM-family model on the CPU its C decode step (`model.cpu_decode_step`) when it
    qualifies (see the module docstring); returns whether it did. `choice`: (mode, Timings, cache
    dtype) of the kernel choice, to time tiers it held in float formats both ways
    (cpu_decode_step.install)."""
    from model.families.custom_llm import DeepSeekMoE
    from model.layers.norms import RMSNorm
    if getattr(model.config, "family", None) != "custom_llm" or _kernel() is None:
        return False
    embeddings = model.token_embeddings.weight
    if embeddings.device.type != "cpu" or embeddings.dtype != torch.float32:
        return False
    for layer in model.decoder_layers:
        norms = (layer.input_norm, layer.post_attn_norm)
        moe = layer.mlp.moe
        if layer.self_attn.decode_kernel is not cpu_paged_mla_decode or not isinstance(moe, DeepSeekMoE) \
                or moe.sync_free or not all(isinstance(n, RMSNorm) and n.weight.dtype == torch.float32
                                            and n.weight.is_contiguous() for n in norms):
            return False
    return install(model, _step_linears, CustomLLMCpuDecodeStep, choice)
