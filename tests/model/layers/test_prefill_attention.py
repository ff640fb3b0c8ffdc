"""Prompt chunks' attention in bfloat16 (model/layers/prefill_attention.py): chosen by timing both
dtypes (faked here: which is faster depends on the machine), only for the grouped-query families,
never in exact mode; a prompt's outputs stay within bfloat16's rounding of float32 and decode steps
are untouched."""
from __future__ import annotations

import pytest
import torch

from model.cache.batch import PagedBatch, SequenceChunk
from model.config import preset
from model.layers import prefill_attention
from model.layers.attention import KernelAttention
from model.layers.kernel_choice import Timings
from model.layers.prefill_attention import time_attention, use_prefill_attention_dtype
from tests.helpers import make_cache, perturbed_model


def attention_modules(model):
    return [m for m in model.modules() if isinstance(m, KernelAttention)]


def fake_attention_timings(monkeypatch, float32: float, bfloat16: float) -> list:
    calls = []

    def fake(dtype, heads, kv_heads, head_dim, tokens=512):
        calls.append((dtype, heads, kv_heads, head_dim))
        return {torch.float32: float32, torch.bfloat16: bfloat16}[dtype]
    monkeypatch.setattr(prefill_attention, "time_attention", fake)
    return calls


def test_bfloat16_when_it_measures_faster_and_cached(monkeypatch, tmp_path):
    model = perturbed_model(preset("llama-tiny"), seed=1)
    calls = fake_attention_timings(monkeypatch, float32=2.0, bfloat16=1.0)
    timings = Timings(tmp_path / "timings.json")
    assert use_prefill_attention_dtype(model, timings) == torch.bfloat16
    cfg = model.config
    assert calls == [(torch.float32, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
                     (torch.bfloat16, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)]
    assert {m.prefill_dtype for m in attention_modules(model)} == {torch.bfloat16}
    again = perturbed_model(preset("llama-tiny"), seed=1)
    assert use_prefill_attention_dtype(again, Timings(tmp_path / "timings.json")) == torch.bfloat16
    assert len(calls) == 2                                                   # read from the cache


def test_float32_when_bfloat16_is_slower(monkeypatch, tmp_path):
    model = perturbed_model(preset("llama-tiny"), seed=1)
    fake_attention_timings(monkeypatch, float32=1.0, bfloat16=2.0)
    assert use_prefill_attention_dtype(model, Timings(tmp_path / "timings.json")) is None
    assert {m.prefill_dtype for m in attention_modules(model)} == {None}


def test_only_families_whose_prompts_take_a_dtype(monkeypatch, tmp_path):
    calls = fake_attention_timings(monkeypatch, float32=2.0, bfloat16=1.0)
    model = perturbed_model(preset("custom-llm-tiny"), seed=1)                  # latent attention: its own path
    assert use_prefill_attention_dtype(model, Timings(tmp_path / "timings.json")) is None and calls == []


def test_time_attention_measures_both_dtypes():
    assert 0 < time_attention(torch.float32, 4, 2, 16, tokens=64)
    assert 0 < time_attention(torch.bfloat16, 4, 2, 16, tokens=64)


def _set(model, dtype) -> None:
    for module in attention_modules(model):
        module.prefill_dtype = dtype


def _run(model, prompt: list[int], steps: int, prompt_dtype=None, decode_dtype=None):
    """Prompt logits (every position) with the attention modules' prefill_dtype `prompt_dtype`, and
    the logits of `steps` greedy decode steps after it with `decode_dtype`."""
    import dataclasses
    cache = make_cache(model.config, num_blocks=16, block_size=4)
    table = list(range(16))
    with torch.inference_mode():
        _set(model, prompt_dtype)
        batch = PagedBatch.build([SequenceChunk(prompt, 0, table)], 4)
        prompt_logits = model.forward_paged(dataclasses.replace(batch, logits_index=torch.arange(len(prompt))),
                                            cache.layers)
        token, decoded = int(prompt_logits[-1].argmax()), []
        _set(model, decode_dtype)
        for n in range(len(prompt), len(prompt) + steps):
            logits = model.forward_paged(PagedBatch.build([SequenceChunk([token], n, table)], 4), cache.layers)
            decoded.append(logits)
            token = int(logits[-1].argmax())
    return prompt_logits, torch.cat(decoded)


@pytest.mark.parametrize("name", ["llama-tiny", "smart-llm-tiny"])
def test_a_prompt_in_bfloat16_stays_close_and_decode_steps_are_untouched(name):
    model = perturbed_model(preset(name), seed=2, std=0.2).eval()
    prompt = torch.randint(0, 256, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    want_prompt, want_decode = _run(model, prompt, steps=3)
    got_prompt, got_decode = _run(model, prompt, steps=3, prompt_dtype=torch.bfloat16)
    difference = float((got_prompt - want_prompt).abs().max())
    assert 0 < difference <= 0.02 * float(want_prompt.abs().max())           # rounded, not wrong
    assert torch.equal(got_prompt.argmax(-1)[-1], want_prompt.argmax(-1)[-1])
    # later layers' cache rows came from the rounded prompt: the decode steps stay as close
    assert float((got_decode - want_decode).abs().max()) <= 0.02 * float(want_decode.abs().max())
    # decode steps themselves take no prefill dtype
    _, decode_after_bf16_setting = _run(model, prompt, steps=3, decode_dtype=torch.bfloat16)
    assert torch.equal(decode_after_bf16_setting, want_decode)


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_serving_takes_it_where_measured_faster_but_never_in_exact_float32(dtype, monkeypatch, tmp_path):
    """The built-in model (Llama family), bfloat16 faked faster: `--dtype auto` takes it, exact
    float32 does not even time it."""
    from server.config import EngineConfig, ModelLoadConfig, ServerConfig
    from server.executor.build import build_engine
    monkeypatch.setenv("CUSTOMLLM_CACHE_DIR", str(tmp_path))
    calls = fake_attention_timings(monkeypatch, float32=2.0, bfloat16=1.0)
    engine = build_engine(ServerConfig(model=ModelLoadConfig(dtype=dtype), engine=EngineConfig(kv_cache_memory_gib=0.05)),
                          start=False)
    want = torch.bfloat16 if dtype == "auto" else None
    assert {m.prefill_dtype for m in attention_modules(engine.model)} == {want}
    assert len(calls) == (2 if dtype == "auto" else 0)


@pytest.mark.parametrize("tiles_seconds, expected", [(0.5, True), (3.0, False)])
def test_the_tile_kernel_where_it_measures_faster_than_bfloat16(tiles_seconds, expected, monkeypatch, tmp_path):
    from model.layers import prompt_ops
    fake_attention_timings(monkeypatch, float32=2.0, bfloat16=1.0)
    timed = []
    monkeypatch.setattr(prefill_attention, "time_tile_attention", lambda *shape: timed.append(shape) or tiles_seconds)
    monkeypatch.setattr(prompt_ops, "has_tile_attention", lambda: True)
    model = perturbed_model(preset("llama-tiny").replace(head_dim=32), seed=1)
    timings = Timings(tmp_path / "timings.json")
    assert use_prefill_attention_dtype(model, timings) == torch.bfloat16
    assert {m.prompt_tile_attention for m in attention_modules(model)} == {expected}
    assert timed == [(4, 2, 32)]
    use_prefill_attention_dtype(perturbed_model(preset("llama-tiny").replace(head_dim=32), seed=1), timings)
    assert len(timed) == 1                                                   # cached
    narrow = perturbed_model(preset("llama-tiny"), seed=1)                   # 16-wide heads: the kernel does not fit
    use_prefill_attention_dtype(narrow, Timings(tmp_path / "other.json"))
    assert {m.prompt_tile_attention for m in attention_modules(narrow)} == {False} and len(timed) == 1
    window = perturbed_model(preset("smart-llm-tiny").replace(hidden_size=128), seed=1)   # 32-wide heads, no kernel
    use_prefill_attention_dtype(window, Timings(tmp_path / "third.json"))
    assert {m.prompt_tile_attention for m in attention_modules(window)} == {False}
