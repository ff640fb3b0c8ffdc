"""The one Linear (model/layers/linear.py): every family builds every projection with it, and the code
that needs a weight matrix (absorbed latent attention, stacked experts) goes through its API."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model.config import preset
from model.layers.linear import Linear
from tests.helpers import perturbed_model

PRESETS = ["custom-llm-tiny", "llama-tiny", "shomsher-tiny", "smart-llm-tiny"]


@pytest.mark.parametrize("name", PRESETS)
def test_every_projection_is_our_linear(name):
    model = perturbed_model(preset(name), seed=1)
    projections = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert projections and all(isinstance(m, Linear) for m in projections)


def test_dense_weight_and_keep_weight_in():
    linear = Linear(3, 2, bias=False)
    assert linear.dense_weight() is linear.weight and linear.dense_weight().shape == (2, 3)
    stacked = torch.stack([linear.dense_weight().detach().clone(), torch.zeros(2, 3)])   # [2, out, in]
    param = linear.weight
    linear.keep_weight_in(stacked[0])
    assert linear.weight is param and linear.weight.data_ptr() == stacked[0].data_ptr()
    with pytest.raises(AssertionError):
        linear.keep_weight_in(torch.zeros(3, 2))


def test_use_column_major_moves_float32_cpu_matrices_only():
    linear = Linear(4, 3)
    x = torch.randn(5, 4)
    before = linear(x)
    assert linear.use_column_major() and linear.weight.t().is_contiguous()
    assert not linear.use_column_major()                               # already moved
    assert torch.allclose(linear(x), before, rtol=1e-6, atol=1e-6)        # same values, another GEMM order
    assert not Linear(4, 3).to(torch.bfloat16).use_column_major()


def test_an_expert_with_products_in_different_formats_takes_either_dtype():
    """A tiny expert's gate and up are too narrow to quantize (float Linears) while its down projection
    may be held as bfloat16, whose activations the MoE converts its input to once: the float
    Linears then get bfloat16 rows, convert them, and return bfloat16 (what the kernel choice may
    make of a tiny CustomLLM model at load)."""
    from model.layers.moe import SwiGLUExpert
    from model.layers.quantized_linear import BFLOAT16, QuantizedLinear
    torch.manual_seed(0)
    expert = SwiGLUExpert(64, 8)
    x = torch.randn(3, 64)
    want = expert(x)                                                             # all float32
    expert.down_proj = QuantizedLinear.from_weight(expert.down_proj.weight, None, BFLOAT16, BFLOAT16)
    x16 = x.to(expert.down_proj.input_dtype(3))
    got = expert(x16)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 64)
    assert torch.allclose(got.float(), want, atol=0.05, rtol=0.05)
    assert expert.gate_proj(x16).dtype == torch.bfloat16
    assert torch.equal(expert.gate_proj(x), x @ expert.gate_proj.weight.t())
