"""A prompt chunk's element-wise steps on bfloat16 activations in C (model/layers/prompt_ops.py):
the kernels against PyTorch's arithmetic, and the Llama family's prompt layers taking them (one sequence
from position 0 attending to its own keys, prefix chunks and batches of prompts through the cache) with
outputs and cache rows as PyTorch's ops give."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.cache.batch import PagedBatch, SequenceChunk
from model.config import preset
from model.families.llama import Rope, _rotate
from model.layers import prompt_ops
from model.layers.quantize import INT4
from model.layers.quantized_linear import BFLOAT16, QuantizedLinear, quantize_model, replace_module
from tests.helpers import make_cache, paged_logits_chunked, perturbed_model

pytestmark = pytest.mark.skipif(not prompt_ops.available(torch.empty(0, dtype=torch.bfloat16)),
                                reason="no C compiler: PyTorch's ops serve")

BF16_STEP = 2.0 ** -7          # one bfloat16 rounding step, relative


def within_one_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """got (bfloat16) is want (float32) rounded to bfloat16, give or take one step."""
    return bool(((got.float() - want).abs() <= want.abs() * BF16_STEP + 1e-30).all())


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_rope_qkv_rotates_writes_the_cache_and_gives_its_rows(cache_dtype, tokens):
    cfg = preset("llama-tiny")
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    generator = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (H + 2 * KV) * hd, generator=generator).bfloat16()        # [T, (H+2KV)*hd]
    positions = torch.randint(0, 200, (tokens,), generator=generator)
    rope = Rope.build(positions, cfg, torch.float32)
    slots = torch.randperm(64, generator=generator)[:tokens]
    cache = torch.full((64, 2 * KV * hd), 7.0, dtype=cache_dtype)
    q, kv = prompt_ops.rope_qkv(qkv, rope.cos, rope.sin, slots, cache, H, KV, hd, with_kv=True)

    rotated = _rotate(qkv.float()[:, : (H + KV) * hd].unflatten(-1, (H + KV, hd)), rope)  # [T, H+KV, hd]
    want_rows = torch.cat([rotated[:, H:].flatten(1), qkv.float()[:, (H + KV) * hd:]], dim=-1)
    assert q.dtype == torch.bfloat16 and q.shape == (tokens, H, hd)
    assert within_one_rounding(q, rotated[:, :H])
    stored = cache[slots].float()
    assert ((stored - want_rows).abs() <= want_rows.abs() * 2.0 ** -7 + 1e-6).all()
    assert torch.equal(stored[:, KV * hd:], qkv.float()[:, (H + KV) * hd:].to(cache_dtype).float())   # values as given
    assert torch.equal(kv, cache[slots].bfloat16())                       # what gathering the cache gives
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert (cache[untouched] == 7.0).all()
    q_only, none = prompt_ops.rope_qkv(qkv, rope.cos, rope.sin, slots, cache, H, KV, hd, with_kv=False)
    assert none is None and torch.equal(q_only, q)


def test_rope_qkv_declines_what_it_does_not_serve():
    cfg = preset("llama-tiny")
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = torch.randn(3, (H + 2 * KV) * hd).bfloat16()
    rope = Rope.build(torch.arange(3), cfg, torch.float32)
    cache = torch.zeros(8, 2 * KV * hd)
    assert prompt_ops.rope_qkv(qkv, rope.cos, rope.sin, torch.arange(3), cache, H, KV, hd + 2, True) is None
    assert prompt_ops.rope_qkv(qkv, rope.cos.bfloat16(), rope.sin, torch.arange(3), cache, H, KV, hd, True) is None
    assert prompt_ops.rope_qkv(qkv[:, :-1], rope.cos, rope.sin, torch.arange(3), cache, H, KV, hd, True) is None


@pytest.mark.parametrize("shape", [(1, 3), (7, 96), (130, 1536)])
def test_swiglu_rounds_once_from_float32(shape):
    rows, inner = shape
    gate_up = (3 * torch.randn(rows, 2 * inner, generator=torch.Generator().manual_seed(inner))).bfloat16()
    gate_up[0, 0], gate_up[0, 1 % inner] = -100.0, 100.0                      # e^-|x| underflows: still exact
    act = prompt_ops.swiglu(gate_up)
    gate, up = gate_up.float().chunk(2, dim=-1)
    want = F.silu(gate) * up
    assert act.dtype == torch.bfloat16 and act.shape == (rows, inner)
    assert within_one_rounding(act, want)
    assert prompt_ops.swiglu(gate_up.float()) is None                         # float32: PyTorch's ops
    assert prompt_ops.swiglu(gate_up[:, ::2]) is None                         # strided


def bfloat16_prompt_model():
    """llama-tiny with int4 weights multiplied as bfloat16 copies at every row count and prompt attention
    in bfloat16: the layers the C prompt path serves."""
    model = perturbed_model(preset("llama-tiny"), seed=3, std=0.2).eval()
    quantize_model(model, INT4)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear) and name != "lm_head":
            replace_module(model, name, module.with_formats(BFLOAT16, BFLOAT16, BFLOAT16))
    for module in model.modules():
        if getattr(module, "HAS_PREFILL_DTYPE", False):
            module.prefill_dtype = torch.bfloat16
    return model


def run_prompts(model, sequences, chunk, cache_dtype, monkeypatch, kernels: bool):
    calls = []
    if kernels:
        original = prompt_ops.rope_qkv
        monkeypatch.setattr(prompt_ops, "rope_qkv", lambda *a, **k: calls.append(k["with_kv"]) or original(*a, **k))
    else:
        monkeypatch.setattr(prompt_ops, "available", lambda x: False)
    cache = make_cache(model.config, num_blocks=96, block_size=4, dtype=cache_dtype)
    with torch.inference_mode():
        logits = paged_logits_chunked(model, cache, sequences, chunk)
    monkeypatch.undo()
    return logits, cache, calls


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sequences, chunk, own_keys", [
    ([list(range(3, 70))], 100, True),                           # one prompt from position 0: its own keys
    ([list(range(3, 70))], 24, False),                           # later chunks read the prefix from the cache
    ([list(range(3, 40)), list(range(50, 61))], 100, False),     # two prompts in one step
])
def test_prompt_layers_in_c_match_pytorchs_ops(sequences, chunk, own_keys, cache_dtype, monkeypatch):
    model = bfloat16_prompt_model()
    want, want_cache, _ = run_prompts(model, sequences, chunk, cache_dtype, monkeypatch, kernels=False)
    got, got_cache, calls = run_prompts(model, sequences, chunk, cache_dtype, monkeypatch, kernels=True)
    assert calls and len(calls) % model.config.num_layers == 0
    assert all(calls) if own_keys else not all(calls)    # a first chunk from position 0 still has its own keys
    for g, w in zip(got, want):
        # SwiGLU rounds once where PyTorch's bfloat16 ops round twice: bfloat16-sized differences
        assert float((g - w).abs().max()) <= 0.02 * float(w.abs().max())
        assert float((g.argmax(-1) == w.argmax(-1)).float().mean()) >= 0.9   # bfloat16 logits: near ties may flip
    for g, w in zip(got_cache.layers, want_cache.layers):
        assert float((g.float() - w.float()).abs().max()) <= 0.02 * float(w.float().abs().max())
    # layer 0's rows come from the same q|k|v (no SwiGLU before them): equal but for float32 arithmetic's
    # last bit (a fused multiply-add in C), which a float16 cache may round to its neighbouring value
    torch.testing.assert_close(got_cache.layers[0].float(), want_cache.layers[0].float(), rtol=2.0 ** -10, atol=1e-6)


def test_decode_steps_keep_their_own_path(monkeypatch):
    model = bfloat16_prompt_model()
    cache = make_cache(model.config, num_blocks=8, block_size=4)
    calls = []
    monkeypatch.setattr(prompt_ops, "rope_qkv", lambda *a, **k: calls.append(1))
    with torch.inference_mode():
        model.forward_paged(PagedBatch.build([SequenceChunk([5], 0, [0])], 4), cache.layers)
    assert calls == []


@pytest.mark.parametrize("shape", [(1, 8), (9, 64), (70, 576)])
def test_add_rms_norm_adds_in_place_and_normalises_as_rms_norm(shape):
    from model.layers.norms import RMSNorm
    generator = torch.Generator().manual_seed(shape[1])
    h = torch.randn(*shape, generator=generator)
    y = torch.randn(*shape, generator=generator).bfloat16()
    norm = RMSNorm(shape[1], 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(shape[1], generator=generator))
        want_h = h + y.float()
        want = norm(want_h)
        out = prompt_ops.add_rms_norm(h, y, norm.weight, norm.eps)
    assert torch.equal(h, want_h)                                             # the same float32 adds
    assert out.dtype == torch.bfloat16 and within_one_rounding(out, want)
    assert prompt_ops.add_rms_norm(h, y.float(), norm.weight, norm.eps) is None
    assert prompt_ops.add_rms_norm(h[:, :-1], y[:, :-1], norm.weight, norm.eps) is None
