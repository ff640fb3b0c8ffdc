"""GGUF quantized tensors kept quantized (model/loading/gguf_quant.py): Q4_0 and Q4_1 map onto the
int4 codes exactly, Q8_0 and the rest are requantized within their rounding, q/k rows are permuted
and q/k/v, gate/up fused as codes, a tied head gets a quantized Linear of its own, and the built-in
file loads as int4 layers with an int8 head."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, quants

from model.layers import integer_dot
from model.layers.quantize import INT4, INT8, pack_int4
from model.layers.quantized_linear import QuantizedLinear
from model.loading.gguf_file import load_gguf, load_gguf_model
from model.loading.gguf_quant import gguf_quantized, kept_kind, read_q4
from tests.default_model import default_gguf_path
from tests.helpers import perturbed_model
from tests.model.loading.test_gguf import tiny_config, write_gguf


@pytest.fixture(scope="module")
def tiny():
    return perturbed_model(tiny_config(), seed=5, std=0.1)


def _tensor(path, name):
    return next(t for t in GGUFReader(str(path)).tensors if t.name == name)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_q4_blocks_map_onto_int4_exactly(tiny, tmp_path, qtype):
    """The codes are the file's nibbles; scale·code + minimum is bit for bit what gguf dequantises
    to; the kernel's (scale, zero) are (d, m + 8d) — Q4_0: (d, 0) — rounded to bfloat16."""
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(path, tiny.config, tiny.state_dict(), qtype=qtype)
    tensor = _tensor(path, "blk.0.ffn_down.weight")
    codes = read_q4(tensor)
    rows, cols = codes.shape
    reference = quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols)
    assert np.array_equal(codes.dequantize().numpy(), reference)
    blocks = np.asarray(tensor.data).reshape(rows, cols // 32, -1)
    head = 4 if qtype == Q.Q4_1 else 2
    low, high = blocks[..., head:] & 15, blocks[..., head:] >> 4
    assert np.array_equal(codes.codes.numpy(), np.concatenate([low, high], -1).reshape(rows, cols))
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if qtype == Q.Q4_1 else -8 * d
    assert np.array_equal(codes.scale.numpy(), d) and np.array_equal(codes.minimum.numpy(), m)
    _, scale_zeros = pack_int4(codes)                                          # [K/32, N, 2]
    assert torch.equal(scale_zeros[..., 0].t(), torch.from_numpy(d).bfloat16())
    assert torch.equal(scale_zeros[..., 1].t(), torch.from_numpy(m + 8 * d).bfloat16())
    if qtype == Q.Q4_0:
        assert not bool(scale_zeros[..., 1].float().any())


def test_other_types_are_requantized_within_their_rounding(tiny, tmp_path):
    path = tmp_path / "tiny-q8.gguf"
    write_gguf(path, tiny.config, tiny.state_dict(), qtype=Q.Q8_0)
    tensor = _tensor(path, "blk.0.ffn_gate.weight")
    rows, cols = (int(d) for d in reversed(tensor.shape))
    exact = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols))
    as_int8 = gguf_quantized(tensor, INT8, lambda: exact)
    step = exact.abs().amax(-1, keepdim=True) / 127
    assert bool(((as_int8.dequantize() - exact).abs() <= 0.51 * step + 1e-7).all())
    assert gguf_quantized(tensor, INT4, lambda: exact).kind == INT4
    assert kept_kind("Q4_1", "auto") == INT4 and kept_kind("Q8_0", "auto") == INT8 and kept_kind("Q6_K", "auto") == INT8
    assert kept_kind("Q4_K", "auto") == INT4 and kept_kind("F16", "auto") is None and kept_kind("Q4_1", "none") is None
    assert kept_kind("Q8_0", "int4") == INT4 and kept_kind("F32", "int4") is None


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_kept_codes_hold_the_files_values_in_our_row_order(tiny, tmp_path, qtype):
    """Every projection kept as codes dequantises to exactly what the float load gives (Q4_x) or
    within int8's rounding of it (Q8_0, requantized per row), q/k rows unpermuted."""
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(path, tiny.config, tiny.state_dict(), qtype=qtype)
    exact = load_gguf(path).state_dict
    kept = load_gguf(path, quantization="auto")
    assert set(kept.quantized) == {k for k in exact if k.endswith("_proj.weight") or k == "lm_head.weight"}
    for key, codes in kept.quantized.items():
        if qtype == Q.Q8_0:
            step = exact[key].abs().amax(-1, keepdim=True) / 127
            assert bool(((codes.dequantize() - exact[key]).abs() <= 0.51 * step + 1e-7).all()), key
        elif codes.kind == INT4:
            assert torch.equal(codes.dequantize(), exact[key]), key
    assert set(kept.state_dict) == {k for k in exact if k not in kept.quantized}
    as_int4 = load_gguf(path, quantization="int4").quantized
    assert as_int4["lm_head.weight"].kind == INT8                               # heads never below int8
    assert {w.kind for k, w in as_int4.items() if k != "lm_head.weight"} == {INT4}


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_a_quantized_model_computes_what_its_float_twin_does(tiny, tmp_path, qtype):
    """The model built from kept codes (fused q/k/v and gate/up as QuantizedLinears) gives the logits
    of the float model over the same dequantized values, within bfloat16 activations' rounding."""
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(path, tiny.config, tiny.state_dict(), qtype=qtype)
    quantized = load_gguf_model(path, quantization="auto").model
    layer = quantized.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantizedLinear) and isinstance(layer.mlp.gate_up_proj, QuantizedLinear)
    twin = load_gguf_model(path).model
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            twin.get_submodule(name).weight.data = module.dense_weight().clone()
    ids = torch.tensor([[5, 70, 263, 9, 120, 44, 61, 200, 13, 99]])
    with torch.no_grad():
        got, expected = quantized.forward_full(ids), twin.forward_full(ids)
    # int8 activations per group of 32 (the integer-dot formats, on a CPU with AVX512-VNNI) round
    # more than bfloat16 ones (PyTorch's kernels) in this tiny random model
    dot = integer_dot.has_vnni()
    assert float((got - expected).abs().max()) <= (0.05 if dot else 0.02) * float(expected.abs().max())
    # the 264-row head: int8 from Q8_0; Q4_1's int4 codes, which PyTorch's int4 kernel cannot take
    # (264 % 16), are held as a float32 matrix of the same values there, as int4-dot where it runs
    head = quantized.lm_head
    if dot:
        assert (head.values, head.formats) == ((INT8, ("int8-dot",)) if qtype == Q.Q8_0 else (INT4, ("int4-dot",)))
    else:
        assert (head.values, head.formats) == ((INT8, (INT8,)) if qtype == Q.Q8_0 else (INT4, ("float32",)))


def test_the_integer_dot_format_keeps_a_gguf_files_scales_exactly(tiny, tmp_path):
    """Q4_1's float16 scales and minimums are held in float32 by int4-dot: the layer multiplies by
    exactly the values gguf's own dequantisation gives (PyTorch's int4 kernel rounds them to bfloat16)."""
    if not integer_dot.has_vnni():
        pytest.skip("held in PyTorch's int4 format on a CPU without AVX512-VNNI")
    path = tmp_path / "tiny-Q4_1.gguf"
    write_gguf(path, tiny.config, tiny.state_dict(), qtype=Q.Q4_1)
    quantized = load_gguf_model(path, quantization="auto").model
    twin = load_gguf_model(path).model                      # dequantised to float32 by the loader
    layer = quantized.model.layers[0].mlp.down_proj
    assert layer.formats == ("int4-dot",)
    assert torch.equal(layer.dense_weight(), twin.model.layers[0].mlp.down_proj.weight)


def test_a_tied_head_kept_quantized_leaves_the_embedding_float(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    tied = perturbed_model(cfg, seed=2)
    write_gguf(tmp_path / "tied.gguf", cfg, tied.state_dict(), qtype=Q.Q8_0)
    model = load_gguf_model(tmp_path / "tied.gguf", quantization="auto").model
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.values == INT8
    assert model.model.embed_tokens.weight.dtype == torch.float32
    float_model = load_gguf_model(tmp_path / "tied.gguf").model
    assert torch.equal(model.model.embed_tokens.weight, float_model.model.embed_tokens.weight)


def test_quantization_stays_on_the_cpu(tiny, tmp_path):
    write_gguf(tmp_path / "t.gguf", tiny.config, tiny.state_dict(), qtype=Q.Q4_1)
    with pytest.raises(ValueError, match="CPU kernels"):
        load_gguf_model(tmp_path / "t.gguf", device="meta", quantization="auto")


def test_the_builtin_file_keeps_int4_layers_and_an_int8_head():
    loaded = load_gguf_model(default_gguf_path(), quantization="auto")
    model = loaded.model
    layers = [m for m in model.model.layers.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 * 30 and all(m.values == INT4 for m in layers)
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.values == INT8
    assert model.lm_head.out_features == 49152 and model.model.embed_tokens.weight.dtype == torch.float32
