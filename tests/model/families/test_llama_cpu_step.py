"""The Llama family's decode steps in one C call (model/families/llama_cpu_step.py): the same logits
and cache rows as the layer-by-layer path over the same integer-dot weights (up to the rounding of
RoPE and SwiGLU, which the C step computes in its own loops), in both row-count tiers, over float32
and bfloat16 caches, on the AVX512-VNNI and the portable product; and the steps it must leave to the
layers (prompt chunks, tiers held in other formats, other attention, torch.compile)."""
from __future__ import annotations

import pytest
import torch

from model.cache.batch import PagedBatch, SequenceChunk
from model.config import preset
from model.families import llama_cpu_step
from model.families.llama_cpu_step import use_cpu_decode_step
from model.layers.cpu_decode_attention import use_cpu_decode_attention
from model.layers.quantized_linear import (BFLOAT16, INT4, INT4_DOT, INT8, INT8_DOT, QuantizedLinear, quantize_model,
                                           replace_module)
from tests.helpers import make_cache, perturbed_model

pytestmark = pytest.mark.skipif(llama_cpu_step._kernel() is None, reason="no C compiler to build the step")

BLOCK = 4


def tiny_model(small: str = INT4_DOT, large: str = INT4_DOT, kind: str = INT4, attention: bool = True):
    """llama-tiny with random weights (norm scales too) quantized to `kind`, its projections held in
    `small` for ≤ 4 rows and `large` above; the head (int8) as int8-dot, whose float32 logits show
    differences a bfloat16 product would round away."""
    model = perturbed_model(preset("llama-tiny"), seed=3, std=0.2).eval()
    quantize_model(model, kind)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, QuantizedLinear):
            replace_module(model.model.layers, name, module.with_formats(small, large))
    model.lm_head = model.lm_head.with_formats(INT8_DOT, INT8_DOT)
    if attention:
        use_cpu_decode_attention(model)
    return model


def prompts(count: int, gen: torch.Generator) -> list[list[int]]:
    return [torch.randint(0, 512, (int(n),), generator=gen).tolist()
            for n in torch.randint(3, 14, (count,), generator=gen)]


def decode_run(model, seqs: list[list[int]], steps: int, cache_dtype=torch.float32, c_step: bool = True):
    """Prefill every prompt (one chunk each), then `steps` greedy decode steps of all sequences
    together: the logits of every decode step [steps, B, V] and the cache layers at the end."""
    cache = make_cache(model.config, num_blocks=128, block_size=BLOCK, dtype=cache_dtype)
    blocks_each = 128 // len(seqs)
    tables = [list(range(b * blocks_each, (b + 1) * blocks_each)) for b in range(len(seqs))]
    saved, model.cpu_decode_step = model.cpu_decode_step, (model.cpu_decode_step if c_step else None)
    out = []
    try:
        with torch.inference_mode():
            last = []
            for seq, table in zip(seqs, tables):
                logits = model.forward_paged(PagedBatch.build([SequenceChunk(seq, 0, table)], BLOCK), cache.layers)
                last.append(int(logits[-1].argmax()))
            lens = [len(s) for s in seqs]
            for _ in range(steps):
                chunks = [SequenceChunk([token], n, table) for token, n, table in zip(last, lens, tables)]
                logits = model.forward_paged(PagedBatch.build(chunks, BLOCK, with_gather=not c_step), cache.layers)
                out.append(logits)
                last, lens = logits.argmax(-1).tolist(), [n + 1 for n in lens]
    finally:
        model.cpu_decode_step = saved
    return torch.stack(out), cache.layers


def assert_close_to_layers(model, rows: int, cache_dtype=torch.float32, steps: int = 4):
    seqs = prompts(rows, torch.Generator().manual_seed(rows))
    # teacher-forced on the layers' own tokens would hide nothing: greedy here, compared step by step
    got, got_cache = decode_run(model, seqs, steps, cache_dtype, c_step=True)
    want, want_cache = decode_run(model, seqs, steps, cache_dtype, c_step=False)
    difference = (got - want).abs()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # relative differences seen (rounding, amplified where it moves an activation's quantization):
    # largest 1.2e-4 to 3.2e-4, mean 0.8e-4 to 1.8e-4; with a bfloat16 cache, whose rows round to 8
    # bits, largest up to 9e-4, mean up to 2.8e-4
    largest, mean = (2e-3, 5e-4) if cache_dtype == torch.bfloat16 else (5e-4, 2.5e-4)
    assert float(difference.max()) <= largest * float(want.abs().max())
    assert float(difference.mean()) <= mean * float(want.abs().mean())
    # a cache value the two paths compute a few float32 bits apart may round to neighbouring 16-bit
    # values: one bfloat16 step is up to 2^-7 of the value
    cache_step = 2.0 ** -7 if cache_dtype == torch.bfloat16 else 2e-3
    for a, b in zip(got_cache, want_cache):
        assert float((a.float() - b.float()).abs().max()) <= cache_step * float(b.float().abs().max()) + 1e-2
    return got, want


@pytest.mark.parametrize("rows", [1, 3, 6, 13])
def test_c_step_matches_the_layers_in_both_tiers(rows):
    model = tiny_model()
    assert use_cpu_decode_step(model)
    assert set(model.cpu_decode_step.tiers) == {4, 64} and all(t is not None for t in model.cpu_decode_step.tiers.values())
    got, want = assert_close_to_layers(model, rows)
    assert got.shape == (4, rows, 512)
    assert not torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_c_step_writes_and_reads_16_bit_caches(cache_dtype):
    model = tiny_model()
    assert use_cpu_decode_step(model)
    assert_close_to_layers(model, 5, cache_dtype)


def test_c_step_with_int8_dot_weights():
    model = tiny_model(INT8_DOT, INT8_DOT, kind=INT8)
    assert use_cpu_decode_step(model)
    assert_close_to_layers(model, 2)


@pytest.fixture
def portable_products():
    """The C step's products through the portable loop (its library's own switch)."""
    llama_cpu_step.force_portable_products(True)
    yield
    llama_cpu_step.force_portable_products(False)


def test_c_step_on_the_portable_products(portable_products):
    model = tiny_model()
    assert use_cpu_decode_step(model)
    assert_close_to_layers(model, 3, steps=2)


def test_a_tier_in_other_formats_is_left_to_the_layers():
    model = tiny_model(INT4_DOT, BFLOAT16)
    assert use_cpu_decode_step(model)
    step = model.cpu_decode_step
    assert step.tiers[4] is not None and step.tiers[64] is None
    cache = make_cache(model.config, num_blocks=16, block_size=BLOCK)
    h = torch.randn(6, model.config.hidden_size)
    before = h.clone()
    batch = PagedBatch.build([SequenceChunk([1], 0, [b]) for b in range(6)], BLOCK, with_gather=False)
    assert not step.run(h, torch.ones(1), torch.ones(1), batch, cache.layers)
    assert torch.equal(h, before)
    assert_close_to_layers(model, 6, steps=2)          # 6 rows: the layers; the small tier: the C step


def test_prompt_chunks_are_left_to_the_layers():
    model = tiny_model()
    assert use_cpu_decode_step(model)
    cache = make_cache(model.config, num_blocks=16, block_size=BLOCK)
    batch = PagedBatch.build([SequenceChunk([1, 2, 3], 0, [0])], BLOCK)
    h = torch.randn(3, model.config.hidden_size)
    assert not model.cpu_decode_step.run(h, torch.ones(1), torch.ones(1), batch, cache.layers)


def test_only_where_every_layer_qualifies():
    assert not use_cpu_decode_step(tiny_model(attention=False))        # gathered attention: the layers
    assert not use_cpu_decode_step(tiny_model(BFLOAT16, BFLOAT16))     # no tier in integer-dot formats
    assert not use_cpu_decode_step(perturbed_model(preset("llama-tiny")))    # float weights
    assert not use_cpu_decode_step(perturbed_model(preset("custom-llm-tiny")))   # another family
    model = tiny_model()
    model.model.layers[1].self_attn.use_decode_kernel(None)
    assert not use_cpu_decode_step(model)


def test_a_new_cache_is_bound_on_first_use():
    model = tiny_model()
    assert use_cpu_decode_step(model)
    first, _ = decode_run(model, prompts(2, torch.Generator().manual_seed(5)), 2)
    again, _ = decode_run(model, prompts(2, torch.Generator().manual_seed(5)), 2)     # another cache's tensors
    assert torch.equal(first, again)
    assert model.cpu_decode_step._cache_key is not None


def test_a_compiled_step_keeps_the_layers():
    """Under torch.compile (`--compile-decode`) the C step steps aside: the graph is the layers'
    (whose RMSNorm inside a graph is PyTorch's, so equal to the eager layers up to its rounding)."""
    model = tiny_model()
    assert use_cpu_decode_step(model)

    def refuse(*args):
        raise AssertionError("the C step ran inside a compiled graph")
    model.cpu_decode_step.kernel = refuse
    cache = make_cache(model.config, num_blocks=16, block_size=BLOCK)
    batch = PagedBatch.build([SequenceChunk([7], 3, [0]), SequenceChunk([9], 5, [1, 2])], BLOCK, with_gather=False)
    compiled = torch.compile(model.forward_paged, backend="eager")
    with torch.inference_mode():
        got = compiled(batch, cache.layers)
        step, model.cpu_decode_step = model.cpu_decode_step, None
        want = model.forward_paged(batch, cache.layers)
        model.cpu_decode_step = step
    # its rounding moves a few activations' int8 digits by one (up to 2e-4 of the logits seen)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3)


def test_batches_may_multiply_by_int8_dot_copies_of_int4_weights():
    """`use_batch_copies`: steps of more than 4 rows multiply by int8-dot copies of the int4 weights
    (requantized per row), steps of up to 4 keep the int4 values; the copies' logits stay within
    their requantization of the int4 ones; dropping them gives the int4 step back exactly."""
    from model.families.llama_cpu_step import _step_linears
    model = tiny_model()
    assert use_cpu_decode_step(model)
    step, linears = model.cpu_decode_step, _step_linears(model)
    seqs = prompts(13, torch.Generator().manual_seed(13))
    want, _ = decode_run(model, seqs, 3)
    assert step.use_batch_copies(linears) == len(linears)
    assert {step.weight(linear, 1).bits for linear in linears} == {4}
    assert {step.weight(linear, 16).bits for linear in linears} == {8}
    got, _ = decode_run(model, seqs, 3)
    # the first step's inputs are the same both ways (later ones follow each side's own greedy tokens);
    # llama-tiny's random weights lose more to a per-row int8 grid than a trained model's (seen: 3.8 %
    # largest, 2 % mean; the built-in model's perplexity moves by 0.1 %, test_quantized_quality)
    difference = (got[0] - want[0]).abs()
    assert 0 < float(difference.max()) <= 0.1 * float(want[0].abs().max())
    assert float(difference.mean()) <= 0.05 * float(want[0].abs().mean())
    assert float((got[0].argmax(-1) == want[0].argmax(-1)).float().mean()) >= 0.9
    step.drop_batch_copies()
    assert torch.equal(decode_run(model, seqs, 3)[0], want)


class _FixedStepTimings:
    """Timings whose step measurements are given: {name: seconds}; records what was saved."""

    def __init__(self, seconds: dict[str, list[float]]):
        self.seconds, self.saved = seconds, False

    def measured(self, key, name, count, measure):
        return self.seconds[name]

    def save(self):
        self.saved = True


@pytest.mark.parametrize("one_call_ms, copies_ms, kept", [(10.0, 8.0, True), (10.0, 11.0, False)])
def test_batch_copies_stay_only_where_whole_steps_time_faster(one_call_ms, copies_ms, kept):
    from model.families.llama_cpu_step import _step_linears
    from model.layers import integer_dot
    from model.layers.cpu_step_choice import choose_batch_copies
    if not integer_dot.has_amx():
        pytest.skip("no AMX tiles here: int8-dot copies are not timed")
    model = tiny_model()
    assert use_cpu_decode_step(model)
    timings = _FixedStepTimings({"batch in one call over int4-dot": [one_call_ms / 1e3],
                                 "batch in one call over int8-dot copies": [copies_ms / 1e3]})
    assert choose_batch_copies(model, model.cpu_decode_step, _step_linears(model), timings) is kept
    assert bool(model.cpu_decode_step.batch_copies) is kept and timings.saved
