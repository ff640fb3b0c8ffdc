"""Formats chosen by measuring (model/layers/kernel_choice.py): the rule that picks one or two formats
from timings, the candidates each kind of values allows, the JSON cache per machine, and models
rebuilt in the chosen formats computing the same values. Timings are faked where the choice is
asserted: which format is fastest depends on the machine (no test asserts a speed)."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from model.config import preset
from model.layers import kernel_choice
from model.layers.cpu_load import CpuLoad
from model.layers.kernel_choice import (ROWS, Timings, candidates, choose_formats, describe_formats, machine_key,
                                        pick, piece_ranges, time_format)
from model.layers.linear import Linear
from model.layers.quantized_linear import (BFLOAT16, FLOAT32, INT4, INT4_DOT, INT8, INT8_DOT, QuantizedLinear,
                                           quantize_model)
from tests.helpers import perturbed_model


def test_one_format_when_it_is_near_the_fastest_at_every_row_count():
    assert pick({INT4: [1.0, 10.0, 90], BFLOAT16: [1.05, 9.5, 80], FLOAT32: [2.0, 30.0, 99]}) == (BFLOAT16,) * 3
    assert pick({INT4: [1.0, 10.0, 90], BFLOAT16: [2.0, 5.0, 40]}) == (INT4, BFLOAT16, BFLOAT16)  # two copies pay
    assert pick({FLOAT32: [1.0, 1.0, 1.0]}) == (FLOAT32,) * 3
    assert pick({INT4: [1.0, 10.0, 90], INT4_DOT: [1.5, 3.0, 60]}, one_copy=True) == (INT4_DOT,) * 3   # lean
    assert ROWS == (1, 16, 256)


def test_prompt_chunks_may_take_a_third_format():
    """int4-dot fastest for decode steps of any size, bfloat16 for prompt chunks: two copies; a
    format an earlier tier took is kept where it is within 10 % (no third copy for 5 %)."""
    assert pick({INT4_DOT: [1.0, 3.0, 60], BFLOAT16: [4.0, 5.0, 40], INT4: [1.5, 9.0, 90]}) == \
        (INT4_DOT, INT4_DOT, BFLOAT16)
    assert pick({INT4_DOT: [1.0, 3.0, 42], BFLOAT16: [4.0, 5.0, 40]}) == (INT4_DOT,) * 3
    assert pick({INT4: [1.0, 9.0, 90], INT4_DOT: [1.5, 3.0, 60], BFLOAT16: [4.0, 5.0, 40]}) == \
        (INT4, INT4_DOT, BFLOAT16)


def test_candidates_follow_the_values_and_the_shapes():
    assert candidates("float", 64, 64, "measured") == (FLOAT32, BFLOAT16)
    assert candidates(INT4, 64, 64, "measured") == (INT4, INT4_DOT, BFLOAT16, FLOAT32)
    assert candidates(INT8, 64, 48, "measured") == (INT8, INT8_DOT, BFLOAT16, FLOAT32)
    assert candidates(INT8, 64, 24, "measured") == (INT8_DOT, BFLOAT16, FLOAT32)      # int8-dot takes any width
    assert candidates(INT4, 64, 64, "lean") == (INT4, INT4_DOT)
    assert candidates(INT4, 264, 64, "lean") == (INT4_DOT,)                  # torch's kernel cannot take 264 rows
    assert candidates(INT4, 264, 48, "lean") == (BFLOAT16, FLOAT32)          # nor can either take 48 columns
    assert candidates(INT8, 7, 64, "measured") == (BFLOAT16, FLOAT32)
    assert candidates("float", 64, 64, "lean") == (FLOAT32, BFLOAT16)


def test_time_format_measures_every_format():
    for fmt, values in ((FLOAT32, "float"), (BFLOAT16, "float"), (INT8, INT8), (INT4, INT4), (BFLOAT16, INT4),
                        (INT4_DOT, INT4), (INT8_DOT, INT8)):
        seconds = time_format(fmt, values, 64, 128, seconds=0.001)
        assert len(seconds) == len(ROWS) and all(0 < s < 1 for s in seconds)


def test_timings_are_cached_per_machine(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(kernel_choice, "time_format", lambda fmt, values, n, k: calls.append(fmt) or [1e-4, 2e-4, 3e-3])
    path = tmp_path / "timings.json"
    timings = Timings(path)
    assert timings.get(INT4, 64, 128, INT4) == [1e-4, 2e-4, 3e-3] and calls == [INT4]
    timings.save()
    saved = json.loads(path.read_text())
    assert saved[machine_key()] == {"int4:64x128": {"int4": [1e-4, 2e-4, 3e-3]}}
    again = Timings(path)
    assert again.get(INT4, 64, 128, INT4) == [1e-4, 2e-4, 3e-3] and calls == [INT4]      # read, not measured
    saved[machine_key()]["int4:64x128"]["int4"] = [1e-4, 2e-4]                       # timed at other rows
    path.write_text(json.dumps(saved))
    assert Timings(path).get(INT4, 64, 128, INT4) == [1e-4, 2e-4, 3e-3] and calls == [INT4, INT4]
    path.write_text("not json")
    assert Timings(path).data == {machine_key(): {}}                                   # a damaged file: start over


class ScriptedMachine:
    """/proc/stat and this process's CPU time as a test sets them: 2 CPUs, 100 jiffies a second."""

    def __init__(self):
        self.now, self.busy, self.total, self.own = 0.0, 0, 0, 0.0

    def load(self) -> CpuLoad:
        load = CpuLoad({0, 1}, read_jiffies=lambda cpus: (self.busy, self.total), own=lambda: self.own,
                       clock=lambda: self.now)
        load.hz = 100
        return load

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        """`seconds` pass with this process on `own_cores` and other processes on `other_cores`."""
        self.now += seconds
        self.total += round(2 * 100 * seconds)
        self.busy += round(100 * seconds * (own_cores + other_cores))
        self.own += seconds * own_cores


@pytest.mark.parametrize("other_cores, warned", [(0.1, False), (0.9, True)])
def test_timings_taken_beside_busy_processes_are_cached_with_a_warning(other_cores, warned, tmp_path, monkeypatch,
                                                                       caplog):
    """Cached either way: a restart must choose the formats its disk cache's blocks were computed with."""
    machine = ScriptedMachine()
    calls = []

    def measure(fmt, values, n, k):
        calls.append(fmt)
        machine.run(2.0, own_cores=2 - other_cores, other_cores=other_cores)
        return [1e-4, 2e-4, 3e-3]
    monkeypatch.setattr(kernel_choice, "time_format", measure)
    path = tmp_path / "timings.json"
    timings = Timings(path, load=machine.load())
    assert timings.get(INT4, 64, 128, INT4) == [1e-4, 2e-4, 3e-3]
    with caplog.at_level(logging.WARNING, logger="customllm.kernels"):
        timings.save()
        timings.save()                                                    # nothing new: no second warning
    assert path.exists()
    assert caplog.text.count("other processes kept 0.9 of the 2 CPUs busy") == (1 if warned else 0)
    assert warned == (str(path) in caplog.text)                           # the warning names the file
    Timings(path, load=machine.load()).get(INT4, 64, 128, INT4)
    assert calls == [INT4]                                                # the next load reads them


def test_a_brief_measurement_is_cached_unjudged(tmp_path, monkeypatch):
    """Under JUDGED_AFTER_S the jiffies (10 ms each) say too little: the timings are cached."""
    machine = ScriptedMachine()
    monkeypatch.setattr(kernel_choice, "time_format",
                        lambda fmt, values, n, k: machine.run(0.1, 0.2, 1.8) or [1e-4, 2e-4, 3e-3])
    path = tmp_path / "timings.json"
    timings = Timings(path, load=machine.load())
    timings.get(INT4, 64, 128, INT4)
    timings.save()
    assert path.exists()


def test_other_processes_cores_are_the_busy_time_less_this_process():
    machine = ScriptedMachine()
    load = machine.load()
    start = load.sample()
    machine.run(4.0, own_cores=1.5, other_cores=0.5)
    assert load.others(start, load.sample()) == pytest.approx(0.5)
    assert load.others(load.sample(), load.sample()) is None               # no time passed


def fake_timings(monkeypatch, tmp_path, table: dict[str, list[float]], pieces: list[float] | None = None) -> Timings:
    """`time_format` answering from `table`; two timings stand for 1 row and 16 and more rows.
    `time_pieces` answers `pieces` ([whole, in pieces] at each of PIECE_AT rows; default: whole faster)."""
    monkeypatch.setattr(kernel_choice, "time_format",
                        lambda fmt, values, n, k: table[fmt] + table[fmt][-1:] * (len(ROWS) - len(table[fmt])))
    monkeypatch.setattr(kernel_choice, "time_pieces",
                        lambda fmt, values, n, k: pieces or [1.0, 2.0] * len(kernel_choice.PIECE_AT))
    return Timings(tmp_path / "timings.json")


@pytest.mark.parametrize("name", ["llama-tiny", "custom-llm-tiny"])
def test_chosen_formats_compute_the_same_values(name, monkeypatch, tmp_path):
    """int4 fastest for one row, bfloat16 for 16 (as on the AMD EPYC): int4 layers gain a bfloat16
    copy for larger steps, float layers move to bfloat16, and every layer's dense weight is the
    values it held before."""
    timings = fake_timings(monkeypatch, tmp_path, {INT4: [1.0, 10.0], BFLOAT16: [2.0, 4.0], FLOAT32: [3.0, 20.0],
                                                  INT8: [1.5, 12.0], INT4_DOT: [5.0, 50.0], INT8_DOT: [5.0, 50.0]})
    model = perturbed_model(preset(name), seed=1)
    quantize_model(model, INT4)
    before = {n: m.dense_weight().clone() for n, m in model.named_modules() if isinstance(m, Linear)}
    ids = torch.tensor([[5, 70, 263, 9, 120, 44]])
    with torch.no_grad():
        expected = model.forward_full(ids)
    chosen = choose_formats(model, "measured", timings)
    assert chosen[(INT4, INT4, BFLOAT16, BFLOAT16)] > 0
    for n, m in model.named_modules():
        if not isinstance(m, Linear):
            continue
        if isinstance(m, QuantizedLinear) and m.values == INT4:
            assert (m.small_format, m.large_format) == (INT4, BFLOAT16)
        float_to_bf16 = isinstance(m, QuantizedLinear) and m.values == "float"   # held as bfloat16 now
        held = before[n].bfloat16().float() if float_to_bf16 else before[n]
        torch.testing.assert_close(m.dense_weight(), held, rtol=0, atol=0)
    with torch.no_grad():
        got = model.forward_full(ids)                          # 6 rows: the bfloat16 copies
    assert float((got - expected).abs().max()) <= 0.03 * float(expected.abs().max())
    assert "as int4 (≤ 4 rows) / bfloat16" in describe_formats(model)


def test_lean_mode_keeps_quantized_layers_alone_and_exact_changes_nothing(monkeypatch, tmp_path):
    timings = fake_timings(monkeypatch, tmp_path, {INT4: [9.0, 9.0], BFLOAT16: [1.0, 1.0], FLOAT32: [3.0, 3.0],
                                                  INT4_DOT: [12.0, 12.0], INT8: [9.0, 9.0], INT8_DOT: [12.0, 12.0]})
    model = perturbed_model(preset("llama-tiny"), seed=1)
    assert not choose_formats(model, "exact", timings)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    quantize_model(model, INT4)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    choose_formats(model, "lean", timings)
    assert all(model.get_submodule(n) is m for n, m in layers.items())
    with pytest.raises(ValueError, match="unknown format mode"):
        choose_formats(model, "fastest", timings)


def test_a_tied_float_head_moves_to_a_linear_of_its_own(monkeypatch, tmp_path):
    timings = fake_timings(monkeypatch, tmp_path, {BFLOAT16: [1.0, 1.0], FLOAT32: [3.0, 3.0]})
    model = perturbed_model(preset("llama-tiny").replace(tie_word_embeddings=True), seed=1)
    h = torch.randn(2, 64)
    with torch.no_grad():
        expected = model.logits(h)
        choose_formats(model, "measured", timings)
        assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.formats == (BFLOAT16,)
        assert model.model.embed_tokens.weight.dtype == torch.float32
        assert float((model.logits(h) - expected).abs().max()) <= 0.02 * float(expected.abs().max())


@pytest.mark.parametrize("name", ["llama-tiny", "custom-llm-tiny"])
def test_integer_dot_formats_hold_the_same_values(name, monkeypatch, tmp_path):
    """The integer-dot formats fastest at both row counts (as on a CPU with AVX512-VNNI): each int4 /
    int8 layer keeps one copy in its "-dot" format, holding the very codes and scales it had, and the
    model's outputs stay within the activations' int8 rounding of the float32 product."""
    timings = fake_timings(monkeypatch, tmp_path, {INT4: [2.0, 10.0], BFLOAT16: [3.0, 4.0], FLOAT32: [3.0, 20.0],
                                                  INT8: [2.0, 12.0], INT4_DOT: [1.0, 2.0], INT8_DOT: [1.0, 2.0]})
    model = perturbed_model(preset(name), seed=1)
    quantize_model(model, INT4)
    before = {n: m.dense_weight().clone() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    ids = torch.tensor([[5, 70, 263, 9, 120, 44]])
    with torch.no_grad():
        expected = model.forward_full(ids)
    chosen = choose_formats(model, "measured", timings)
    assert chosen[(INT4, INT4_DOT, INT4_DOT, INT4_DOT)] > 0
    for n, m in model.named_modules():
        if isinstance(m, QuantizedLinear) and m.values != "float":
            assert m.formats == ({INT4: INT4_DOT, INT8: INT8_DOT}[m.values],)
            torch.testing.assert_close(m.dense_weight(), before[n], rtol=0, atol=0)
    with torch.no_grad():
        got = model.forward_full(ids)
    # int8 activations per group of 32 are coarser than bfloat16 for a group's small values
    # (2-3 % here, in random tiny models; tests/model/test_perplexity.py bounds the real model)
    assert float((got - expected).abs().max()) <= 0.05 * float(expected.abs().max())
    assert "as int4-dot" in describe_formats(model)


def test_each_tier_multiplies_in_its_own_format():
    """≤ 4 rows: the small format; ≤ 64: the large one; more: the prefill one — each step's product
    the very one a layer holding only that format computes."""
    from model.layers.quantize import quantize
    weight = quantize(torch.randn(64, 96, generator=torch.Generator().manual_seed(3)), INT4)
    tiers = QuantizedLinear.from_weight(weight, None, INT4, INT4_DOT, prefill_format=BFLOAT16)
    assert tiers.formats == (INT4, INT4_DOT, BFLOAT16) and "(≤ 64 rows) / bfloat16" in tiers.extra_repr()
    alone = {fmt: QuantizedLinear.from_weight(weight, None, fmt, fmt) for fmt in tiers.formats}
    for rows, fmt in ((4, INT4), (5, INT4_DOT), (64, INT4_DOT), (65, BFLOAT16), (300, BFLOAT16)):
        x = torch.randn(rows, 96)
        assert torch.equal(tiers(x), alone[fmt](x)), (rows, fmt)
    copy = tiers.with_formats(INT4_DOT, INT4_DOT)                       # prefill follows the large format
    assert copy.formats == (INT4_DOT,) and copy.prefill_format == INT4_DOT


def test_piece_ranges_follow_the_rows_where_pieces_won():
    assert piece_ranges([1.0, 2.0] * 3) == ()
    assert piece_ranges([1.0, 0.5, 1.0, 0.95, 1.0, 0.8]) == ((512, 896), (1152, 1408))   # 0.95: under the 10 %


def test_dense_prompt_products_go_in_pieces_where_they_measured_faster(monkeypatch, tmp_path):
    """Pieces faster at 1,024 rows only: every layer with a dense prompt format takes 896 < rows ≤ 1,152
    in 512-row pieces (and gives what the whole product gives), other row counts whole; the head stays
    whole (its prompt rows are the few whose logits are asked for)."""
    timings = fake_timings(monkeypatch, tmp_path, {INT4: [1.0, 10.0], BFLOAT16: [2.0, 4.0], FLOAT32: [3.0, 20.0],
                                                  INT8: [1.5, 12.0], INT4_DOT: [5.0, 50.0], INT8_DOT: [5.0, 50.0]},
                           pieces=[1.0, 2.0, 2.0, 1.0, 1.0, 2.0])
    model = perturbed_model(preset("llama-tiny"), seed=1)
    quantize_model(model, INT4)
    choose_formats(model, "measured", timings)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert all(m.prompt_pieces == ((896, 1152),) for n, m in layers.items() if n != "lm_head")
    layer = layers["model.layers.0.mlp.down_proj"]
    products = []
    monkeypatch.setattr(torch, "mm", lambda *a, **k: products.append(a[0].shape[0]) or torch.ops.aten.mm.out(*a, **k))
    with torch.inference_mode():
        for rows, pieces in ((1000, [512, 488]), (1200, []), (700, [])):
            x = torch.randn(rows, layer.in_features)
            got = layer(x)
            assert products == pieces
            layer.prompt_pieces = ()
            whole = layer(x)
            layer.prompt_pieces = ((896, 1152),)
            products.clear()
            torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
