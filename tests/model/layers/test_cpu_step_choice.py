"""The one-call decode step's tiers chosen by timing whole steps (model/layers/cpu_step_choice.py):
where the kernel choice held a step's projections in dense formats (their codes kept reachable), a
tier whose step is faster in one call moves to integer-dot over the very same codes, and one that is
slower goes back to the kernel choice's formats and the layers; timings are cached. Step timings
are faked where the choice is asserted (which way is faster depends on the machine)."""
from __future__ import annotations

import pytest
import torch

from model.layers import cpu_step_choice, integer_dot
from model.layers.cpu_step_choice import step_key, time_decode_step
from model.layers.kernel_choice import choose_formats
from model.config import preset
from model.families import custom_llm_cpu_step, llama_cpu_step
from model.layers.cpu_decode_attention import use_cpu_decode_attention
from model.layers.quantized_linear import (BFLOAT16, FLOAT32, INT4, INT4_DOT, INT8, INT8_DOT, QuantizedLinear,
                                           fuse_quantized_projections, quantize_model, release_held_codes)
from tests.helpers import perturbed_model
from tests.model.families import test_custom_llm_cpu_step as custom_tests
from tests.model.families.test_llama_cpu_step import assert_close_to_layers
from tests.model.layers.test_kernel_choice import fake_timings

pytestmark = pytest.mark.skipif(llama_cpu_step._kernel() is None or not integer_dot.has_vnni(),
                                reason="the one-call step needs a C compiler and AVX512-VNNI")

# products alone: float32 fastest at one row, bfloat16 at 16, the integer-dot formats slowest (as
# the kernel choice measured the built-in model's smaller shapes on an Intel Xeon with AMX)
DENSE_FASTEST = {FLOAT32: [1.0, 3.0, 9.0], BFLOAT16: [2.0, 2.0, 2.0], INT4: [5.0, 9.0, 9.0], INT8: [5.0, 9.0, 9.0],
                 INT4_DOT: [1.5, 4.0, 9.0], INT8_DOT: [1.5, 4.0, 9.0]}
FAMILIES = {"llama": llama_cpu_step, "custom_llm": custom_llm_cpu_step}


def dense_held_model(family: str, monkeypatch, tmp_path, keep_codes: bool = True):
    """A tiny model quantized to int4 (the head int8), its formats chosen from DENSE_FASTEST as
    `serve` chooses them (then joined), and the CPU decode attention: every quantized Linear dense."""
    timings = fake_timings(monkeypatch, tmp_path, DENSE_FASTEST)
    config = preset("llama-tiny") if family == "llama" else custom_tests.TINY
    model = perturbed_model(config, seed=3, std=0.2).eval()
    quantize_model(model, INT4)
    codes = {name: m.dense_weight().clone() for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    choose_formats(model, "measured", timings, keep_codes=keep_codes)
    fuse_quantized_projections(model)
    use_cpu_decode_attention(model)
    assert all(set(m.formats) <= {FLOAT32, BFLOAT16} for m in model.modules() if isinstance(m, QuantizedLinear))
    return model, timings, codes


def fake_steps(monkeypatch, layers: list[float], one_call: list[float]) -> list[int]:
    """time_decode_step answering `layers[i]` or `one_call[i]` (i: 0 for one row, 1 for 16) as the
    model has a C step or not; returns the rows of every call."""
    calls = []

    def fake(model, rows, cache_dtype=torch.float32):
        calls.append(rows)
        return (one_call if model.cpu_decode_step is not None else layers)[0 if rows == 1 else 1]
    monkeypatch.setattr(cpu_step_choice, "time_decode_step", fake)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_tiers_faster_in_one_call_move_to_integer_dot_over_the_same_codes(family, monkeypatch, tmp_path):
    model, timings, codes = dense_held_model(family, monkeypatch, tmp_path)
    calls = fake_steps(monkeypatch, layers=[2.0, 3.0], one_call=[1.0, 2.0])
    key = step_key(model)
    assert FAMILIES[family].use_cpu_decode_step(model, choice=("measured", timings))
    step = model.cpu_decode_step
    # then, on AMX tiles, the batch tier once more with int8-dot copies and without (choose_batch_copies)
    batch_copies = [16, 16] if integer_dot.has_amx() else []
    assert all(step.tiers[rows] is not None for rows in (4, 64)) and calls == [1, 16, 1, 16] + batch_copies
    assert not step.batch_copies                  # no faster with them (the fake times both alike)
    for m in FAMILIES[family]._step_linears(model):
        assert (m.small_format, m.large_format) == (INT4_DOT, INT4_DOT)
        assert m.prefill_format in (FLOAT32, BFLOAT16)
    # the joined projections hold the parts' codes: dequantized, exactly what was loaded
    first = model.model.layers[0].mlp.gate_up_proj if family == "llama" else model.decoder_layers[0].self_attn.o_proj
    name = next(n for n, m in model.named_modules() if m is first)
    assert torch.equal(first.dense_weight(), codes[name])
    assert timings.machine[key] == {"layer by layer": [2.0, 3.0], "one call": [1.0, 2.0]}
    assert release_held_codes(model) > 0          # the head, still dense-only, let go of its codes
    assert_close_to_layers(model, 3, steps=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tier_slower_in_one_call_goes_back_to_the_layers(family, monkeypatch, tmp_path):
    model, timings, _ = dense_held_model(family, monkeypatch, tmp_path)
    fake_steps(monkeypatch, layers=[2.0, 1.0], one_call=[1.0, 2.0])
    assert FAMILIES[family].use_cpu_decode_step(model, choice=("measured", timings))
    step = model.cpu_decode_step
    assert step.tiers[4] is not None and step.tiers[64] is None
    linears = list(FAMILIES[family]._step_linears(model))
    assert {(m.small_format, m.large_format) for m in linears} == {(INT4_DOT, BFLOAT16)}
    assert_close_to_layers(model, 6, steps=2)      # 6 rows: the layers, in bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tier_slower_in_one_call_leaves_no_step(family, monkeypatch, tmp_path):
    model, timings, _ = dense_held_model(family, monkeypatch, tmp_path)
    fake_steps(monkeypatch, layers=[1.0, 1.0], one_call=[2.0, 2.0])
    assert not FAMILIES[family].use_cpu_decode_step(model, choice=("measured", timings))
    assert model.cpu_decode_step is None
    linears = list(FAMILIES[family]._step_linears(model))
    assert {(m.small_format, m.large_format) for m in linears} == {(FLOAT32, BFLOAT16)}


def test_cached_step_timings_are_not_measured_again(monkeypatch, tmp_path):
    model, timings, _ = dense_held_model("llama", monkeypatch, tmp_path)
    fake_steps(monkeypatch, layers=[2.0, 3.0], one_call=[1.0, 2.0])
    assert llama_cpu_step.use_cpu_decode_step(model, choice=("measured", timings))
    again, timings_again, _ = dense_held_model("llama", monkeypatch, tmp_path)
    calls = fake_steps(monkeypatch, layers=[9.0, 9.0], one_call=[9.0, 9.0])
    assert llama_cpu_step.use_cpu_decode_step(again, choice=("measured", timings_again)) and calls == []


def test_without_kept_codes_dense_tiers_stay_with_the_layers(monkeypatch, tmp_path):
    model, timings, _ = dense_held_model("llama", monkeypatch, tmp_path, keep_codes=False)
    calls = fake_steps(monkeypatch, layers=[2.0, 3.0], one_call=[1.0, 2.0])
    assert not llama_cpu_step.use_cpu_decode_step(model, choice=("measured", timings))
    assert calls == [] and model.cpu_decode_step is None
    with pytest.raises(ValueError, match="has no codes"):
        model.lm_head.quantized_weight()


def test_held_codes_are_released():
    model = perturbed_model(preset("llama-tiny"), seed=3).eval()
    quantize_model(model, INT8)
    head = model.lm_head
    dense = head.with_formats(FLOAT32, BFLOAT16)
    dense.hold_codes(head.quantized_weight)
    assert torch.equal(dense.quantized_weight().codes, head.quantized_weight().codes)
    model.lm_head = dense
    assert release_held_codes(model) == 1 and release_held_codes(model) == 0
    with pytest.raises(ValueError, match="has no codes"):
        dense.quantized_weight()


@pytest.mark.parametrize("family", FAMILIES)
def test_time_decode_step_runs_both_ways(family):
    """The real timing: a step through the layers and one in one call, each a positive time."""
    model = custom_tests.tiny_model() if family == "custom_llm" else perturbed_model(preset("llama-tiny"), seed=3)
    if family == "llama":
        quantize_model(model, INT4)
        use_cpu_decode_attention(model)
    layers_s = time_decode_step(model, 2)
    assert FAMILIES[family].use_cpu_decode_step(model)
    assert 0 < time_decode_step(model, 2) and 0 < layers_s
