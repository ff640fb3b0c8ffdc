"""The CustomLLM family's decode steps in one C call (model/families/custom_llm_cpu_step.py): the same
logits and latent cache rows as the layer-by-layer path over the same integer-dot weights (up to
the rounding of RoPE, the absorbed products, routing and SwiGLU, which the C step computes in its
own loops), in both row-count tiers, with one and with two shared experts, over float32 and 16-bit
caches; and where it must not take over."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import preset
from model.families import custom_llm_cpu_step
from model.families.custom_llm_cpu_step import use_cpu_decode_step
from model.layers.cpu_decode_attention import use_cpu_decode_attention
from model.layers.quantized_linear import (DOT_FORMATS, INT4, INT4_DOT, INT8_DOT, QuantizedLinear, fuse_quantized_projections,
                                           quantize_model, replace_module)
from tests.helpers import perturbed_model
from tests.model.families.test_llama_cpu_step import assert_close_to_layers

pytestmark = pytest.mark.skipif(custom_llm_cpu_step._kernel() is None, reason="no C compiler to build the step")

# custom-llm-tiny with a latent of 32 (the integer-dot products need input widths that are multiples of 32)
TINY = dataclasses.replace(preset("custom-llm-tiny"), latent_dim=32)


def tiny_model(config=TINY, formats: str = "dot", attention: bool = True):
    """Random weights (norm scales and routing biases too) quantized to int4 as `--quantization int4`
    loads them (projections of one input joined), then every quantized Linear in `formats`: "dot"
    (int4-dot, the head int8-dot), "torch" (PyTorch's int4 kernel for decode tiers, as the kernel
    choice may leave a shape)."""
    model = perturbed_model(config, seed=5, std=0.2).eval()
    quantize_model(model, INT4)
    fuse_quantized_projections(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear) and module.values in DOT_FORMATS:
            fmt = DOT_FORMATS[module.values] if formats == "dot" or name == "lm_head" else module.values
            replace_module(model, name, module.with_formats(fmt, fmt))
    if attention:
        use_cpu_decode_attention(model)
    return model


@pytest.mark.parametrize("rows", [1, 3, 6, 11])
def test_c_step_matches_the_layers(rows):
    model = tiny_model()
    assert use_cpu_decode_step(model)
    assert all(layers is not None for layers in model.cpu_decode_step.tiers.values())
    got, want = assert_close_to_layers(model, rows)
    assert got.shape == (4, rows, 512)


def test_two_shared_experts_and_three_routed_per_token():
    config = dataclasses.replace(TINY, num_shared_experts=2, top_k_experts=3)
    model = tiny_model(config)
    assert use_cpu_decode_step(model)
    assert_close_to_layers(model, 5)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_c_step_writes_and_reads_16_bit_latent_caches(cache_dtype):
    model = tiny_model()
    assert use_cpu_decode_step(model)
    assert_close_to_layers(model, 4, cache_dtype)


def test_torch_kernel_formats_are_moved_to_integer_dot():
    """Where the kernel choice kept PyTorch's int4 kernel for decode steps, the step holds those
    projections as int4-dot (the values unchanged: the same codes and scales)."""
    from model.layers import integer_dot
    if not integer_dot.has_vnni():
        pytest.skip("without AVX512-VNNI the formats are left as measured")
    model = tiny_model(formats="torch")
    before = model.decoder_layers[0].self_attn.input_proj.dense_weight().clone()
    assert use_cpu_decode_step(model)
    joined = model.decoder_layers[0].self_attn.input_proj
    assert (joined.small_format, joined.large_format) == (INT4_DOT, INT4_DOT)
    assert torch.equal(joined.dense_weight(), before)
    assert_close_to_layers(model, 2, steps=2)


def test_only_where_every_layer_qualifies():
    assert not use_cpu_decode_step(tiny_model(attention=False))               # gathered attention
    assert not use_cpu_decode_step(perturbed_model(TINY))                      # float weights
    assert not use_cpu_decode_step(perturbed_model(preset("llama-tiny")))      # another family
    narrow = perturbed_model(preset("custom-llm-tiny")).eval()                 # latent 16: c_q's products stay float
    quantize_model(narrow, INT4)
    fuse_quantized_projections(narrow)
    use_cpu_decode_attention(narrow)
    assert not use_cpu_decode_step(narrow)


def test_parts_left_apart_by_differing_formats_are_joined():
    """The kernel choice may give kv_proj_d / q_proj_d PyTorch's int4 kernel and rope_k int4-dot, so
    loading cannot join them: the step moves them to int4-dot and joins them."""
    from model.layers import integer_dot
    if not integer_dot.has_vnni():
        pytest.skip("without AVX512-VNNI the formats are left as measured")
    model = perturbed_model(TINY, seed=5, std=0.2).eval()
    quantize_model(model, INT4)
    for layer in model.decoder_layers:
        for name in ("kv_proj_d", "q_proj_d"):
            part = getattr(layer.self_attn, name)
            setattr(layer.self_attn, name, part.with_formats(INT4, INT4))
        layer.self_attn.rope_k = layer.self_attn.rope_k.with_formats(INT4_DOT, INT4_DOT)
    fuse_quantized_projections(model)
    assert not model.decoder_layers[0].self_attn.fused_parts("input_proj")
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear) and module.values in DOT_FORMATS and module.formats == (INT4,):
            if "kv_proj_d" not in name and "q_proj_d" not in name:
                replace_module(model, name, module.with_formats(DOT_FORMATS[module.values], DOT_FORMATS[module.values]))
    model.lm_head = model.lm_head.with_formats(INT8_DOT, INT8_DOT)       # float32 logits to compare
    use_cpu_decode_attention(model)
    assert use_cpu_decode_step(model)
    assert model.decoder_layers[0].self_attn.fused_parts("input_proj")
    assert_close_to_layers(model, 3, steps=2)
