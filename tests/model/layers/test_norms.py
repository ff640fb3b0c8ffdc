"""RMSNorm's C kernel on the CPU (model/layers/native/rms_norm.c) against PyTorch's rms_norm and the
plain formula, for one row, a batch, a 3-D input; and the cases it leaves to PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.layers import norms
from model.layers.norms import RMSNorm, cpu_rms_norm

pytestmark = pytest.mark.skipif(norms._rms_norm_kernel() is None, reason="no C compiler: PyTorch's rms_norm serves")


@pytest.mark.parametrize("shape", [(1, 576), (16, 576), (3, 7, 64), (300, 96), (2, 5)])
def test_the_kernel_gives_rms_norm(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    dim = shape[-1]
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data = torch.randn(dim, generator=generator)
    x = 3 * torch.randn(*shape, generator=generator)
    got = norm(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, F.rms_norm(x, (dim,), norm.weight, 1e-5), rtol=2e-6, atol=2e-6)
    plain = norm.weight.double() * x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(got.double(), plain, rtol=2e-6, atol=2e-6)


def test_a_row_is_normalised_alike_in_any_batch():
    generator = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, 1e-6)
    x = torch.randn(64, 96, generator=generator)
    together = norm(x)
    assert all(torch.equal(together[r], norm(x[r:r + 1])[0]) for r in range(64))


def test_other_inputs_take_pytorchs_rms_norm():
    weight = torch.randn(32)
    assert cpu_rms_norm(torch.randn(4, 64)[:, :32], weight, 1e-5) is None                  # strided rows
    assert cpu_rms_norm(torch.randn(4, 32, dtype=torch.bfloat16), weight, 1e-5) is None
    norm = RMSNorm(32, 1e-5)
    x = torch.randn(4, 64)[:, :32]
    torch.testing.assert_close(norm(x), F.rms_norm(x, (32,), norm.weight, 1e-5), rtol=0, atol=0)
