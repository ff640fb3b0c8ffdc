"""Quantized weights (model/layers/quantize.py) and the QuantizedLinear that multiplies by them
(model/layers/quantized_linear.py): codes and scales, the kernels' packed layouts, every format's
product against the same values in float64, the dense weight the absorbed attention reads, and
quantizing every family's tiny model at load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import preset
from model.layers.linear import Linear
from model.layers.quantize import (GROUP, QuantizedWeight, dequantize_int4_packed, head_kind, pack_int4, quantize,
                                   quantize_int4, quantize_int8, unpack_int4_codes)
from model.layers.quantized_linear import (BFLOAT16, FLOAT32, INT4, INT8, QuantizedLinear, format_bytes,
                                           format_supported, quantize_model, quantized_head, tied_head_table)
from tests.helpers import perturbed_model

PRESETS = ["custom-llm-tiny", "llama-tiny", "shomsher-tiny", "smart-llm-tiny"]


def weight(rows=96, cols=128, seed=0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int4_codes_scales_and_rounding():
    w = weight()
    q = quantize_int4(w)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape and int(q.codes.max()) <= 15
    assert q.scale.shape == (96, 128 // GROUP) == q.minimum.shape
    # scale and zero are bfloat16 values, as the kernel holds them
    assert torch.equal(q.scale, q.scale.bfloat16().float())
    assert torch.equal(q.minimum + 8 * q.scale, (q.minimum + 8 * q.scale).bfloat16().float())
    step = q.scale.repeat_interleave(GROUP, dim=1)
    assert bool(((q.dequantize() - w).abs() <= 0.5 * step * 1.02 + 1e-7).all())       # nearest code
    constant = quantize_int4(torch.full((16, 32), 0.25))
    assert torch.allclose(constant.dequantize(), torch.full((16, 32), 0.25), atol=1e-3)


def test_int8_codes_and_rounding():
    w = weight()
    q = quantize_int8(w)
    assert q.codes.dtype == torch.int8 and q.scale.shape == (96, 1) and q.minimum is None
    assert int(q.codes.abs().max()) <= 127
    assert bool(((q.dequantize() - w).abs() <= 0.5 * q.scale + 1e-7).all())
    assert torch.equal(quantize(torch.zeros(16, 16), "int8").dequantize(), torch.zeros(16, 16))
    with pytest.raises(ValueError, match="int4 or int8"):
        quantize(w, "int3")


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 208, 960])
def test_int4_pack_layout_round_trips(rows):
    """Pins the layout of this torch's `_convert_weight_to_int4pack_for_cpu` (blocks of 64 rows, a
    tail of N % 64 rows) that `dense_weight()` reads back."""
    q = quantize_int4(weight(rows, 96, seed=rows))
    packed, scale_zeros = pack_int4(q)
    assert packed.shape == (rows, 48) and scale_zeros.shape == (3, rows, 2) and scale_zeros.dtype == torch.bfloat16
    assert torch.equal(unpack_int4_codes(packed, rows, 96), q.codes)
    assert torch.equal(dequantize_int4_packed(packed, scale_zeros, rows, 96), q.dequantize())


def test_format_rules_and_bytes():
    assert format_supported(INT4, 96, 64) and not format_supported(INT4, 100, 64) and not format_supported(INT4, 96, 48)
    assert format_supported(INT8, 20, 48) and not format_supported(INT8, 20, 40)
    assert not format_supported(INT4, 7, 64) and not format_supported(INT8, 7, 64)     # routers stay float
    assert format_supported(BFLOAT16, 7, 5) and format_supported(FLOAT32, 7, 5)
    assert format_bytes(FLOAT32, 10, 64) == 2560 and format_bytes(BFLOAT16, 10, 64) == 1280
    assert format_bytes(INT8, 10, 64) == 640 + 20 and format_bytes(INT4, 16, 64) == 512 + 2 * 16 * 4


FORMAT_PAIRS = [(INT4, INT4), (INT4, BFLOAT16), (FLOAT32, INT4), (INT8, INT8), (INT8, FLOAT32),
                (FLOAT32, FLOAT32), (BFLOAT16, BFLOAT16), (FLOAT32, BFLOAT16)]


@pytest.mark.parametrize("small,large", FORMAT_PAIRS, ids=lambda f: f)
def test_each_format_multiplies_by_the_same_values(small, large):
    """Every format computes x · Wᵀ + b for the values W the layer holds (its `dense_weight()`),
    within the rounding of bfloat16 activations (and outputs), at 1, 3 (small steps) and 37 rows."""
    values = next((f for f in (small, large) if f in (INT4, INT8)), "float")
    w, bias = weight(), torch.randn(96) * 0.1
    source = w if values == "float" else quantize(w, values)
    layer = QuantizedLinear.from_weight(source, bias, small, large)
    dense = layer.dense_weight()
    assert dense.shape == (96, 128) and dense.dtype == torch.float32
    held = source if values == "float" else source.dequantize()
    if BFLOAT16 in (small, large) and values == "float":
        held = held.bfloat16().float() if FLOAT32 not in (small, large) else held
    torch.testing.assert_close(dense, held, rtol=0, atol=0)
    for rows in (1, 3, 37):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        got = layer(x[None])[0]                                          # [1, rows, in]: any leading dims
        expected = (x.double() @ dense.double().t() + bias.double()).float()
        fmt = layer.format_for(rows)
        tolerance = 0 if fmt == FLOAT32 else 2 ** -7                     # bf16 activations and outputs
        assert got.dtype == torch.float32 and got.shape == (rows, 96)
        assert float((got - expected).abs().max()) <= tolerance * float(expected.abs().max()) + 1e-5, (rows, fmt)
    assert layer(torch.zeros(0, 128)).shape == (0, 96)


def test_dense_weight_is_cached_and_float32_copies_are_shared():
    layer = QuantizedLinear.from_weight(quantize_int4(weight()), None, INT4, INT4)
    assert layer.dense_weight() is layer.dense_weight()
    both = layer.with_formats(INT4, FLOAT32)
    assert both.weight_int4 is layer.weight_int4                          # packed weights shared, not copied
    assert both.dense_weight() is both.weight_f32 and both.weight_f32.t().is_contiguous()   # column-major
    torch.testing.assert_close(both.weight_f32, layer.dense_weight(), rtol=0, atol=0)
    assert not both.use_column_major()
    stacked = torch.zeros(2, 96, 128)
    both.keep_weight_in(stacked[0])                                       # packed weights stay
    assert both.weight_int4 is layer.weight_int4
    with pytest.raises(ValueError, match="cannot become int8"):
        layer.with_formats(INT8, INT8)
    with pytest.raises(ValueError, match="cannot be stored as int4"):
        QuantizedLinear.from_weight(weight(), None, INT4, INT4)          # float values: quantize first
    assert both.weight_bytes(1) == format_bytes(INT4, 96, 128) and both.weight_bytes(16) == format_bytes(FLOAT32, 96, 128)


@pytest.mark.parametrize("kind", [INT4, INT8])
@pytest.mark.parametrize("name", PRESETS)
def test_quantize_model_takes_every_projection_it_can(name, kind):
    """Every Linear whose shape the kernel takes, and a tied head; the output head as int8 when the
    layers are int4 (head_kind); MoE routers (fewer than 16 outputs) stay float."""
    model = perturbed_model(preset(name), seed=1)
    head_name = "lm_head" if hasattr(model, "lm_head") else None
    eligible = [n for n, m in model.named_modules() if isinstance(m, Linear)
                and format_supported(head_kind(kind) if n == head_name else kind, m.out_features, m.in_features)]
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    tied = tied_head_table(model) is not None and format_supported(head_kind(kind), vocab, hidden)
    count = quantize_model(model, kind)
    assert count == len(eligible) + tied
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == count
    for n, m in quantized.items():
        values = head_kind(kind) if n == "lm_head" else kind
        assert m.values == values and m.formats == (values,), n
    assert quantized_head(model) == format_supported(head_kind(kind), vocab, hidden)   # (ShomsherLLM-tiny: d 36)
    routers = [m for m in model.modules() if isinstance(m, Linear) and m.out_features < 16]
    assert all(not isinstance(m, QuantizedLinear) for m in routers)
    ids = torch.tensor([[5, 70, 263, 9, 120, 44]])
    with torch.no_grad():
        assert torch.isfinite(model.forward_full(ids)).all()


def test_a_tied_head_gets_a_quantized_linear_and_the_table_stays_float():
    model = perturbed_model(preset("llama-tiny").replace(tie_word_embeddings=True), seed=2)
    table = model.model.embed_tokens.weight
    quantize_model(model, INT4)
    assert isinstance(model.lm_head, QuantizedLinear) and model.model.embed_tokens.weight is table
    assert model.lm_head.values == INT8 and model.model.layers[0].mlp.down_proj.values == INT4
    assert table.dtype == torch.float32 and tied_head_table(model) is None
    h = torch.randn(3, 64)
    expected = F.linear(h, model.lm_head.dense_weight())
    assert float((model.logits(h) - expected).abs().max()) <= 2 ** -7 * float(expected.abs().max())


def test_cat_and_select_rows():
    a, b = quantize_int4(weight(32, 64, 1)), quantize_int4(weight(16, 64, 2))
    joined = QuantizedWeight.cat([a, b])
    torch.testing.assert_close(joined.dequantize(), torch.cat([a.dequantize(), b.dequantize()]), rtol=0, atol=0)
    order = torch.arange(47, -1, -1)
    torch.testing.assert_close(joined.select_rows(order).dequantize(), joined.dequantize()[order], rtol=0, atol=0)
    with pytest.raises(AssertionError):
        QuantizedWeight.cat([a, quantize_int8(weight(16, 64))])
