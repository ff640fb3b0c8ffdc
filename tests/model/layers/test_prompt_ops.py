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
from model.families import llama
from model.families.llama import Rope, _rotate
from model.layers import prompt_ops
from model.layers.quantize import INT4
from model.layers.quantized_linear import BFLOAT16, QuantizedLinear, quantize_model, replace_module
from tests.helpers import make_cache, paged_logits_chunked, perturbed_model

pytestmark = pytest.mark.skipif(not prompt_ops.built(),
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


def bfloat16_prompt_model(config=None):
    """llama-tiny (or `config`) with int4 weights multiplied as bfloat16 copies at every row count and
    prompt attention in bfloat16: the layers the C prompt path serves."""
    model = perturbed_model(config or preset("llama-tiny"), seed=3, std=0.2).eval()
    quantize_model(model, INT4)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear) and name != "lm_head":
            replace_module(model, name, module.with_formats(BFLOAT16, BFLOAT16, BFLOAT16))
    for module in model.modules():
        if getattr(module, "HAS_PREFILL_DTYPE", False):
            module.prefill_dtype = torch.bfloat16
    return model


def run_prompts(model, sequences, chunk, cache_dtype, monkeypatch, kernels: bool):
    """Logits and cache of `sequences` in chunks, through the C prompt path (`kernels`: calls lists each
    RoPE call's with_kv) or PyTorch's ops (the kernels reported absent: calls stays empty)."""
    calls = []
    original = prompt_ops.rope_qkv
    monkeypatch.setattr(prompt_ops, "rope_qkv", lambda *a, **k: calls.append(k["with_kv"]) or original(*a, **k))
    if not kernels:
        monkeypatch.setattr(prompt_ops, "built", lambda: False)
    cache = make_cache(model.config, num_blocks=96, block_size=4, dtype=cache_dtype)
    with torch.inference_mode():
        logits = paged_logits_chunked(model, cache, sequences, chunk)
    monkeypatch.undo()
    return logits, cache, calls


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sequences, chunk, own_keys", [
    ([list(range(3, 70))], 100, True),                           # one prompt from position 0: its own keys
    ([list(range(3, 70))], 24, False),                           # later chunks read the prefix from the cache
    ([list(range(3, 40)), list(range(50, 61))], 100, True),      # two prompts in one step: their own keys
])
def test_prompt_layers_in_c_match_pytorchs_ops(sequences, chunk, own_keys, cache_dtype, monkeypatch):
    model = bfloat16_prompt_model()
    want, want_cache, none = run_prompts(model, sequences, chunk, cache_dtype, monkeypatch, kernels=False)
    got, got_cache, calls = run_prompts(model, sequences, chunk, cache_dtype, monkeypatch, kernels=True)
    assert none == []
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


@pytest.mark.parametrize("chunk, rows_out", [(100, 2), (24, 0)])
def test_the_last_layer_goes_on_with_the_logits_rows_only(chunk, rows_out, monkeypatch):
    """Two prompts in one step: every layer caches every row's keys and values, but the last layer's
    MLP takes only the rows whose logits are asked for (two: one per prompt), and a chunk that asks for
    none (the first of a chunked prompt) runs no attention in the last layer."""
    model = bfloat16_prompt_model()
    layers = model.model.layers
    seen, attended = [], []
    monkeypatch.setattr(layers[-1].mlp, "forward", lambda x: seen.append(x.shape[0]) or torch.zeros_like(x))
    original = llama.grouped_query_attention                     # llama-tiny's 16-wide heads: not the tile kernel
    monkeypatch.setattr(llama, "grouped_query_attention", lambda q, *a: attended.append(q.shape[0]) or original(q, *a))
    cache = make_cache(model.config, num_blocks=32, block_size=4)
    prompts = [list(range(3, 40)), list(range(50, 61))] if rows_out else [list(range(3, 40))]
    tables = [list(range(0, 10)), list(range(10, 13))]
    chunks = [SequenceChunk(ids[:chunk], 0, table, needs_logits=len(ids) <= chunk)
              for ids, table in zip(prompts, tables)]
    with torch.inference_mode():
        logits = model.forward_paged(PagedBatch.build(chunks, 4), cache.layers)
    assert logits.shape[0] == rows_out
    assert seen == ([rows_out] if rows_out else [])
    assert len(attended) == model.config.num_layers - (0 if rows_out else 1)
    assert cache.layers[-1][: len(prompts[0][:chunk])].abs().sum() > 0          # the last layer's rows are cached


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


tiles = pytest.mark.skipif(not prompt_ops.has_tile_attention(), reason="no AMX-BF16 here: PyTorch's attention serves")


def reference_attention(q: torch.Tensor, kv: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Causal grouped-query attention in float32 of the same bfloat16 inputs → [T, H, hd]."""
    tokens, heads, hd = q.shape
    keys = kv[:, : kv_heads * hd].float().unflatten(-1, (kv_heads, hd)).transpose(0, 1)     # [KV, T, hd]
    values = kv[:, kv_heads * hd:].float().unflatten(-1, (kv_heads, hd)).transpose(0, 1)    # [KV, T, hd]
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), keys, values, is_causal=True, scale=1.0,
                                         enable_gqa=True)                                 # [H, T, hd]
    return out.transpose(0, 1)


@tiles
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 32), (2, 1, 64)])
@pytest.mark.parametrize("tokens", [1, 7, 16, 33, 100, 300])
def test_tile_attention_is_causal_grouped_attention(heads, kv_heads, head_dim, tokens):
    generator = torch.Generator().manual_seed(tokens * heads + head_dim)
    q = (torch.randn(tokens, heads, head_dim, generator=generator) / 4).bfloat16()
    kv = torch.randn(tokens, 2 * kv_heads * head_dim, generator=generator).bfloat16()
    got = prompt_ops.causal_attention(q, kv, kv_heads)
    want = reference_attention(q, kv, kv_heads)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    # the weights are rounded to bfloat16 for the product with V, as PyTorch's bfloat16 kernel does
    assert float((got.float() - want).abs().max()) <= 0.02 * float(want.abs().max())
    assert torch.equal(got[0].float(), kv[0, kv_heads * head_dim:].float().view(kv_heads, head_dim)
                       .repeat_interleave(heads // kv_heads, 0))                # the first query sees itself only


@tiles
def test_tile_attention_keeps_prompts_apart():
    """Several prompts in one call: each attends to its own keys only, as if it were alone."""
    heads, kv_heads, hd, lengths = 9, 3, 64, [37, 1, 16, 70, 5]
    generator = torch.Generator().manual_seed(5)
    tokens = sum(lengths)
    q = (torch.randn(tokens, heads, hd, generator=generator) / 4).bfloat16()
    kv = torch.randn(tokens, 2 * kv_heads * hd, generator=generator).bfloat16()
    starts = torch.tensor([0] + lengths).cumsum(0)
    got = prompt_ops.causal_attention(q, kv, kv_heads, starts=starts)
    for first, last in zip(starts[:-1].tolist(), starts[1:].tolist()):
        alone = prompt_ops.causal_attention(q[first:last].contiguous(), kv[first:last].contiguous(), kv_heads)
        assert torch.equal(got[first:last], alone)
        want = reference_attention(q[first:last], kv[first:last], kv_heads)
        assert float((got[first:last].float() - want).abs().max()) <= 0.02 * float(want.abs().max())


@tiles
def test_tile_attention_redoes_a_block_whose_later_scores_dwarf_its_first():
    """The first 32 keys score ~0, one later key ~150 (scale 1): shifting by the first block's maximum
    would overflow float32, so the block is redone with the true maximum."""
    tokens, heads, kv_heads, hd = 80, 2, 1, 32
    q = torch.zeros(tokens, heads, hd)
    q[:, :, 0] = 12.0
    kv = torch.zeros(tokens, 2 * kv_heads * hd)
    kv[:, hd:] = torch.randn(tokens, hd, generator=torch.Generator().manual_seed(0))      # values
    kv[50, 0] = 12.5                                                                      # key 50 scores 150
    q, kv = q.bfloat16(), kv.bfloat16()
    got = prompt_ops.causal_attention(q, kv, kv_heads)
    want = reference_attention(q, kv, kv_heads)
    assert torch.isfinite(got.float()).all()
    assert float((got.float() - want).abs().max()) <= 0.02 * float(want.abs().max())
    assert torch.equal(got[60:].float(), kv[50, hd:].float().expand(20, heads, hd))       # key 50 takes it all


def test_tile_attention_declines_other_shapes():
    q = torch.randn(5, 4, 16).bfloat16()
    assert prompt_ops.causal_attention(q, torch.randn(5, 2 * 2 * 16).bfloat16(), 2) is None      # hd 16
    q = torch.randn(5, 4, 32)
    assert prompt_ops.causal_attention(q, torch.randn(5, 2 * 2 * 32), 2) is None                 # float32


@tiles
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sequences", [[list(range(3, 90))], [list(range(3, 90)), list(range(100, 117)), [7, 8, 9]]])
def test_prompts_attend_in_the_tile_kernel(sequences, cache_dtype, monkeypatch):
    """llama-tiny with 32-wide heads: prompts from position 0 (alone or several in one step) through the
    tile kernel give what PyTorch's bfloat16 attention gives, within bfloat16's rounding."""
    config = preset("llama-tiny").replace(head_dim=32)
    model = bfloat16_prompt_model(config)
    want, want_cache, _ = run_prompts(model, sequences, 100, cache_dtype, monkeypatch, kernels=True)
    calls = []
    original = prompt_ops.causal_attention
    monkeypatch.setattr(prompt_ops, "causal_attention",
                        lambda q, *a, **k: calls.append(q.shape[0]) or original(q, *a, **k))
    for module in model.modules():
        if getattr(module, "TILE_ATTENTION", False):
            module.prompt_tile_attention = True
    got, got_cache, _ = run_prompts(model, sequences, 100, cache_dtype, monkeypatch, kernels=True)
    assert calls == [sum(map(len, sequences))] * config.num_layers
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) <= 0.02 * float(w.abs().max())
    for g, w in zip(got_cache.layers, want_cache.layers):
        assert float((g.float() - w.float()).abs().max()) <= 0.02 * float(w.float().abs().max())


@pytest.mark.parametrize("chunks, want_starts, want_decodes", [
    ([(0, 5), (0, 3)], [0, 5, 8], 0),                 # prompts from position 0 only
    ([(7, 1), (4, 1), (0, 5), (0, 3)], [0, 5, 8], 2),  # two running sequences' decodes, then two new prompts
    ([(0, 1), (0, 4)], [0, 1, 5], 0),                 # a one-token prompt from position 0 is a prompt too
    ([(7, 1), (0, 1), (0, 4)], [0, 4], 2),            # ... unless it is among the leading one-token chunks
    ([(7, 1), (4, 2), (0, 3)], None, 0),              # a prompt continuing from the cache: no own-key split
    ([(0, 5), (7, 1)], None, 0),                      # a decode after a prompt: the rows are not in that order
    ([(7, 1), (4, 1)], None, 0),                      # decode-only steps have their own path
])
def test_a_step_names_its_prompts_from_position_0(chunks, want_starts, want_decodes):
    batch = PagedBatch.build([SequenceChunk(list(range(3, 3 + n)), start, list(range(4 * i, 4 * i + 4)))
                              for i, (start, n) in enumerate(chunks)], 4)
    assert batch.leading_decodes == want_decodes
    got = None if batch.prompt_starts is None else batch.prompt_starts.tolist()
    assert got == want_starts


@tiles
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_decodes_beside_new_prompts_attend_in_the_kernels(cache_dtype, monkeypatch):
    """A continuous-batching step (two running sequences decode one token each while two new prompts
    start): the prompts attend in the tile kernel over their own keys, the decodes in the decode kernel
    over the cache, and together they give what PyTorch's bfloat16 attention over the gathered
    context gives, within bfloat16's rounding."""
    from model.layers.cpu_decode_attention import use_cpu_decode_attention

    config = preset("llama-tiny").replace(head_dim=32)
    model = bfloat16_prompt_model(config)
    for module in model.modules():
        if getattr(module, "TILE_ATTENTION", False):
            module.prompt_tile_attention = True
    assert use_cpu_decode_attention(model) == config.num_layers
    decoded = []
    for layer in model.model.layers:
        kernel = layer.self_attn.decode_kernel
        layer.self_attn.use_decode_kernel(lambda q, *a, kernel=kernel: decoded.append(q.shape[0]) or kernel(q, *a))
    running, prompts = [list(range(3, 40)), list(range(60, 71))], [list(range(100, 130)), [5, 6, 7]]
    tables = [list(range(0, 10)), list(range(10, 13)), list(range(20, 28)), list(range(30, 31))]

    def mixed_step(kernels: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        attended = []
        original = prompt_ops.causal_attention
        monkeypatch.setattr(prompt_ops, "causal_attention",
                            lambda q, *a, **k: attended.append(q.shape[0]) or original(q, *a, **k))
        if not kernels:
            monkeypatch.setattr(prompt_ops, "built", lambda: False)
        cache = make_cache(model.config, num_blocks=32, block_size=4, dtype=cache_dtype)
        with torch.inference_mode():
            model.forward_paged(PagedBatch.build([SequenceChunk(ids[:-1], 0, table[: -(-(len(ids) - 1) // 4)])
                                                  for ids, table in zip(running, tables)], 4), cache.layers)
            chunks = ([SequenceChunk(ids[-1:], len(ids) - 1, table[: -(-len(ids) // 4)])
                       for ids, table in zip(running, tables)]
                      + [SequenceChunk(ids, 0, table[: -(-len(ids) // 4)]) for ids, table in zip(prompts, tables[2:])])
            batch = PagedBatch.build(chunks, 4)
            assert batch.leading_decodes == 2
            batch.logits_index = torch.arange(batch.token_ids.shape[0])          # every row's logits
            logits = model.forward_paged(batch, cache.layers)
        monkeypatch.undo()
        first_step = [sum(map(len, running)) - 2] * config.num_layers        # the running ones' prompts
        assert attended == (first_step + [sum(map(len, prompts))] * config.num_layers if kernels else [])
        return logits, cache.layers

    want, want_cache = mixed_step(kernels=False)
    assert decoded == []
    got, got_cache = mixed_step(kernels=True)
    assert decoded == [2] * config.num_layers
    assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max())
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9
    for g, w in zip(got_cache, want_cache):
        assert float((g.float() - w.float()).abs().max()) <= 0.02 * float(w.float().abs().max())
