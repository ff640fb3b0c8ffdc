"""The integer-dot products (model/layers/integer_dot.py, native/quant_matmul.c) against a float64
reference of the same arithmetic: activations rounded to two int8 digits per group of 32 columns,
int4 codes times those, plus each group's minimum times the exact sum of its x; int8 codes times the
same rounded activations (on the AMX tiles: two digits relative to the whole row). Every path this CPU has (AMX tiles for batches of 12 rows or more,
AVX512-VNNI, the portable loop), over shapes with every kind of tail: output features not a multiple
of 16 (tiles of 1, 2 or 3 blocks), batch rows not a multiple of 4 or of the tiles' 16, input widths
not a multiple of 64."""
from __future__ import annotations

import itertools

import pytest
import torch

from model.layers import integer_dot
from model.layers.quantize import GROUP, INT4, QuantizedWeight, quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(not integer_dot.available(), reason="no C compiler: the kernels cannot be built")

SHAPES = [(960, 576), (40, 32), (48, 96), (1000, 64), (100, 608), (16, 160), (7 * 16 + 3, 224)]
ROWS = [1, 2, 3, 4, 5, 9, 16, 17, 35]


def int8_activations(x: torch.Tensor, whole_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → (x as the kernels round it, the exact x), float64; K padded to whole groups with
    zeros. The rounding, in float32 as in the C code: u = x · 127 / max|x| per group of 32 (per row:
    `whole_row`), hi = round(u), lo = round(256 · (u − hi)) within ±127,
    x ≈ max|x| / (127 · 256) · (256 · hi + lo)."""
    rows, cols = x.shape
    padded = torch.zeros(rows, -(-cols // GROUP) * GROUP)
    padded[:, :cols] = x
    groups = padded.view(rows, -1, GROUP)
    amax = groups.abs().amax(-1, keepdim=True)                                          # float32
    if whole_row:
        amax = amax.amax(1, keepdim=True).expand_as(amax)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    u = groups * inv
    hi = torch.round(u)
    lo = torch.round((u - hi) * 256).clamp(-127, 127)
    codes = 256 * hi.double() + lo.double()
    scale = (amax / (127.0 * 256.0)).double()
    return (codes * scale).view(rows, -1)[:, :cols], x.double()


def reference_int4(x: torch.Tensor, weight) -> torch.Tensor:
    rounded, exact = int8_activations(x)
    minimum = weight.minimum.double().repeat_interleave(GROUP, 1)                     # [N, K]
    return rounded @ (weight.dequantize().double() - minimum).t() + exact @ minimum.t()


def reference_int8(x: torch.Tensor, weight, path: str = "vnni") -> torch.Tensor:
    """The int8 product as `path` rounds x: per group, or per row on the tiles (`amx_min_rows()` rows and more)."""
    whole_row = path == "amx" and x.shape[0] >= integer_dot.amx_min_rows()
    return int8_activations(x, whole_row)[0] @ weight.dequantize().double().t()


@pytest.fixture(params=integer_dot.PATHS)
def path(request):
    if request.param == "vnni" and not integer_dot.has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI")
    if request.param == "amx" and not integer_dot.has_amx():
        pytest.skip("this CPU (or its kernel) gives no AMX tiles")
    assert integer_dot.force_path(request.param) == request.param
    yield request.param
    integer_dot.force_path(integer_dot.PATHS[-1])


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def int4_weight(features: int, width: int, generator, scales: str) -> QuantizedWeight:
    """A random int4 weight whose scales and minimums are float16 values ("float16": GGUF's Q4_1) or
    not ("float32": some need float32's bits)."""
    weight = quantize_int4(torch.randn(features, width, generator=generator) * 0.05)
    scale, minimum = weight.scale.half().float(), weight.minimum.half().float()
    if scales == "float32":
        minimum = minimum * (1 + 2.0 ** -20)                              # between float16 values
    return QuantizedWeight(INT4, weight.codes, scale, minimum)


@pytest.mark.parametrize("scales", ["float16", "float32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_products_match_the_reference(path, shape, scales):
    generator = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    features, width = shape
    weight = int4_weight(features, width, generator, scales)
    packed = integer_dot.pack_int4_dot(weight)
    assert packed.shape[2] == {"float16": 1280, "float32": 1536}[scales]
    assert integer_dot.int4_half_scales(packed) == (scales == "float16")
    for rows in ROWS:
        x = torch.randn(rows, width, generator=generator)
        got = integer_dot.int4_dot_mm(x, packed, features)
        assert got.shape == (rows, features) and got.dtype == torch.float32
        assert relative_error(got, reference_int4(x, weight)) < 2e-6, (path, shape, rows)


@pytest.mark.parametrize("shape", SHAPES + [(33, 20), (64, 100)])
def test_int8_products_match_the_reference(path, shape):
    generator = torch.Generator().manual_seed(shape[0] * 5 + shape[1])
    features, width = shape
    weight = quantize_int8(torch.randn(features, width, generator=generator) * 0.05)
    packed = integer_dot.pack_int8_dot(weight)
    for rows in ROWS:
        x = torch.randn(rows, width, generator=generator)
        got = integer_dot.int8_dot_mm(x, *packed, features)
        assert got.shape == (rows, features)
        assert relative_error(got, reference_int8(x, weight, path)) < 2e-6, (path, shape, rows)


def test_strided_zero_and_empty_activations(path):
    generator = torch.Generator().manual_seed(3)
    weight = quantize_int4(torch.randn(48, 128, generator=generator))
    packed = integer_dot.pack_int4_dot(weight)
    wide = torch.randn(5, 256, generator=generator)
    x = wide[:, 64:192]                                                  # rows 256 floats apart
    torch.testing.assert_close(integer_dot.int4_dot_mm(x, packed, 48),
                               integer_dot.int4_dot_mm(x.contiguous(), packed, 48), rtol=0, atol=0)
    x = x.clone()
    x[1] = 0                                                             # a row of zeros (scale 0)
    x[2, :32] = 0                                                        # one zero group
    assert relative_error(integer_dot.int4_dot_mm(x, packed, 48), reference_int4(x, weight)) < 2e-6
    assert torch.equal(integer_dot.int4_dot_mm(x, packed, 48)[1], weight.minimum.new_zeros(48))
    assert integer_dot.int4_dot_mm(x[:0], packed, 48).shape == (0, 48)


def test_packing_round_trips():
    generator = torch.Generator().manual_seed(4)
    for (features, width), scales in itertools.product(((40, 96), (16, 32), (7, 64)), ("float16", "float32")):
        weight = int4_weight(features, width, generator, scales)
        back = integer_dot.unpack_int4_dot(integer_dot.pack_int4_dot(weight), features)
        assert torch.equal(back.codes, weight.codes)
        assert torch.equal(back.scale, weight.scale) and torch.equal(back.minimum, weight.minimum)
        eight = quantize_int8(torch.randn(features, width + 3, generator=generator))
        back = integer_dot.unpack_int8_dot(*integer_dot.pack_int8_dot(eight), features, width + 3)
        assert torch.equal(back.codes, eight.codes) and torch.equal(back.scale, eight.scale)


def test_compiled_graphs_call_the_kernels_as_opaque_ops():
    generator = torch.Generator().manual_seed(5)
    weight = quantize_int4(torch.randn(64, 96, generator=generator))
    packed = integer_dot.pack_int4_dot(weight)
    x = torch.randn(3, 96, generator=generator)

    def step(x):
        return torch.relu(integer_dot.int4_dot_mm(x * 2, packed, 64)) + 1

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x), rtol=0, atol=0)


def test_activations_keep_about_fifteen_bits_per_group():
    """A group with one large value (the outlier activations this model family has) keeps its small
    values to within half of 1/32512 of the large one (one int8 digit would round values up to 2.4 to 0)."""
    x = torch.full((1, 64), 0.01)
    x[0, 3] = 600.0
    x[0, 8:32] = torch.linspace(-1, 1, 24)                          # in the outlier's group
    rounded, exact = int8_activations(x)
    half_step = 600.0 / (127 * 256) / 2
    assert float((rounded - exact).abs().max()) <= half_step * 1.001
    weight = quantize_int8(torch.eye(64))                           # (nearly) the identity
    got = integer_dot.int8_dot_mm(x, *integer_dot.pack_int8_dot(weight), 64)
    assert relative_error(got, reference_int8(x, weight)) < 2e-6
    assert float((got[0, 8:32].double() - exact[0, 8:32]).abs().max()) < half_step + 1e-3


def test_int8_tiles_round_each_row_once():
    """On the tiles an int8 product's activations have one scale per row: a row whose groups differ
    by orders of magnitude keeps ~15 bits relative to its largest value (not to each group's), and the
    result is that rounding's product exactly (the per-group reference would differ)."""
    if not integer_dot.has_amx():
        pytest.skip("this CPU (or its kernel) gives no AMX tiles")
    generator = torch.Generator().manual_seed(6)
    weight = quantize_int8(torch.randn(64, 96, generator=generator))
    packed = integer_dot.pack_int8_dot(weight)
    x = torch.randn(integer_dot.amx_min_rows(), 96, generator=generator)
    x[:, 32:64] *= 1e-3                                                 # a quiet middle group
    got = integer_dot.int8_dot_mm(x, *packed, 64)
    assert relative_error(got, reference_int8(x, weight, "amx")) < 2e-6
    rounded, exact = int8_activations(x, whole_row=True)
    # within one step of each row's own grid (half a step, or one where the low digit is clamped at ±127)
    steps = x.double().abs().amax(1) / (127 * 256)                                 # [rows]
    assert bool(((rounded - exact).abs().amax(1) <= steps * 1.001).all())
