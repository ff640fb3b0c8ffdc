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
