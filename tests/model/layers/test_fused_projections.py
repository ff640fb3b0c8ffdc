"""Quantized projections of one input joined into one product (model/layers/quantized_linear.py:
`fuse_linears`, `fuse_quantized_projections`; model/layers/linear.py: `FusableProjections`), and the
MoE's routing with one host read (model/layers/moe.py: `route_to_experts`)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model.config import preset
from model.layers.linear import Linear
from model.layers.moe import SwiGLUExpert, route_to_experts
from model.layers.quantize import quantize
from model.layers.quantized_linear import (BFLOAT16, FLOAT32, INT4, INT8, QuantizedLinear, fuse_linears,
                                           fuse_quantized_projections, quantize_model)
from tests.helpers import make_cache, paged_logits_chunked, perturbed_model

# custom-llm-tiny with a latent of 32, so that the int4 kernel takes the query's projections too
TINY_LATENT_32 = preset("custom-llm-tiny").replace(latent_dim=32)


def quantized_layer(rows: int, cols: int, fmt: str, seed: int) -> QuantizedLinear:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    values = weight if fmt in (BFLOAT16, FLOAT32) else quantize(weight, fmt)
    return QuantizedLinear.from_weight(values, None, fmt, fmt)


@pytest.mark.parametrize("fmt,rows", [(INT4, (64, 128)), (INT4, (128, 32)), (INT4, (32, 48, 16)),
                                      (INT8, (24, 40)), (BFLOAT16, (24, 40, 8))],
                         ids=["int4-whole-blocks", "int4-tail-last", "int4-repacked", "int8", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_a_joined_layer_gives_each_parts_product_exactly(fmt, rows, tokens):
    parts = [quantized_layer(n, 64, fmt, seed) for seed, n in enumerate(rows)]
    joined = fuse_linears(parts)
    assert joined.out_features == sum(rows) and joined.formats == (fmt,)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        for got, part in zip(joined(x).split(list(rows), dim=-1), parts):
            assert torch.equal(got, part(x))
    assert torch.equal(joined.dense_weight(), torch.cat([p.dense_weight() for p in parts]))


def test_what_is_not_joined():
    int4 = quantized_layer(32, 64, INT4, 0)
    assert fuse_linears([int4, Linear(64, 32, bias=False)]) is None                        # a float Linear
    assert fuse_linears([quantized_layer(32, 64, FLOAT32, 1), quantized_layer(32, 64, FLOAT32, 2)]) is None
    assert fuse_linears([int4, quantized_layer(32, 64, INT8, 3)]) is None                   # other formats
    assert fuse_linears([int4, quantized_layer(32, 96, INT4, 4)]) is None                   # another input
    assert fuse_linears([int4, int4.with_formats(INT4, FLOAT32)]) is None                  # a float32 copy


def test_a_float_model_is_left_as_it_is():
    model = perturbed_model(TINY_LATENT_32, seed=1)
    keys = list(model.state_dict())
    assert fuse_quantized_projections(model) == 0
    assert list(model.state_dict()) == keys


@torch.no_grad()
def test_a_joined_model_computes_the_same_logits_as_its_parts():
    """Attention (x's three projections, c_q's two) and every expert's gate|up joined: the paged form
    in one-token steps and in chunks, and the full form, give the very logits of the parts."""
    cfg = TINY_LATENT_32
    separate = perturbed_model(cfg, seed=3, std=0.15)
    quantize_model(separate, INT4)
    joined = copy.deepcopy(separate)
    experts = cfg.num_shared_experts + cfg.num_routed_experts
    assert fuse_quantized_projections(joined) == cfg.num_layers * (2 + experts)
    attention, expert = joined.decoder_layers[0].self_attn, joined.decoder_layers[1].mlp.moe.routed_experts[4]
    assert isinstance(attention.input_proj, QuantizedLinear) and isinstance(attention.query_proj, QuantizedLinear)
    assert not hasattr(attention, "kv_proj_d") and not hasattr(expert, "gate_proj")
    assert expert.fused_parts("gate_up_proj") == [("gate_proj", cfg.expert_hidden), ("up_proj", cfg.expert_hidden)]
    seqs = [list(range(1, 24)), list(range(40, 51))]
    for chunk in (1, 7):
        want = paged_logits_chunked(separate, make_cache(cfg, num_blocks=32, block_size=4), seqs, chunk)
        got = paged_logits_chunked(joined, make_cache(cfg, num_blocks=32, block_size=4), seqs, chunk)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    ids = torch.tensor([seqs[0]])
    assert torch.equal(joined.forward_full(ids), separate.forward_full(ids))


def per_expert_routing(x, top_w, top_e, experts):
    """The form route_to_experts replaced: a count and a nonzero per expert, index_add_ of its tokens."""
    out = torch.zeros_like(x)
    for e in range(len(experts)):
        token_idx, slot = (top_e == e).nonzero(as_tuple=True)
        if len(token_idx):
            out.index_add_(0, token_idx, experts[e](x[token_idx]) * top_w[token_idx, slot, None])
    return out


@pytest.mark.parametrize("tokens", [1, 2, 9, 40])
@torch.no_grad()
def test_routing_with_one_host_read_equals_the_per_expert_form(tokens):
    generator = torch.Generator().manual_seed(tokens)
    torch.manual_seed(tokens)
    experts = nn.ModuleList(SwiGLUExpert(16, 24) for _ in range(5))
    x = torch.randn(tokens, 16, generator=generator)
    scores = torch.rand(tokens, 5, generator=generator)
    top_w, top_e = scores.topk(2, dim=-1)
    if tokens == 1:
        top_e = top_e.flip(-1)                # the larger expert index first: summed in expert order all the same
        top_w = top_w.flip(-1)
    got = route_to_experts(x, top_w, top_e, experts)
    assert torch.equal(got, per_expert_routing(x, top_w, top_e, experts))


@torch.no_grad()
def test_quantized_experts_take_bfloat16_once_and_return_the_models_dtype():
    model = perturbed_model(TINY_LATENT_32, seed=5)
    quantize_model(model, INT4)
    fuse_quantized_projections(model)
    moe = model.decoder_layers[0].mlp.moe
    assert moe.shared_experts[0].down_proj.input_dtype(1) == torch.bfloat16
    x = torch.randn(3, TINY_LATENT_32.hidden_size, generator=torch.Generator().manual_seed(6))
    assert moe(x).dtype == torch.float32 and moe(x[:1]).dtype == torch.float32
    float_moe = perturbed_model(TINY_LATENT_32, seed=5).decoder_layers[0].mlp.moe
    assert float_moe.shared_experts[0].down_proj.input_dtype(1) is None
