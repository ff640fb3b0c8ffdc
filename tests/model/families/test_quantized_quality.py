"""Quantized outputs are checked, not assumed: the built-in model (SmolLM2-135M-Instruct, its Q4_1
GGUF) on a fixed English text (tests/data/perplexity_text.txt, 464 tokens) has a perplexity within
1 % of the float32 path over the same GGUF weights, held as
- int4 from the Q4_1 tensors and an int8 head (requantized from its Q8_0): what `--dtype auto`
  keeps, which on a CPU with AVX512-VNNI is the integer-dot formats (the file's values exactly; int8
  activations per group of 32), else PyTorch's int4 kernel (scales rounded to bfloat16; bfloat16
  activations);
- the same codes in PyTorch's int4 / int8 kernels' formats (where "auto" took the integer-dot ones);
- the same values in bfloat16 copies (what `--dtype auto` multiplies steps of more than 4 rows by
  where bfloat16 measures faster);
- int8 everywhere (`--quantization int8`), through PyTorch's kernel and through int8-dot;
- "auto" with its decode steps in one C call (model/families/llama_cpu_step.py), as `serve` runs
  them: the greedy runs go through it;
- "auto" with its prompt's attention in bfloat16 (model/layers/prefill_attention.py), as `serve`
  runs prompts where bfloat16 measures faster: the text's perplexity through the paged prefill path
  (the whole text as one prompt chunk), the greedy runs' prompts too;
- "auto" with its prompts as `serve` runs them where bfloat16 measures faster: bfloat16 copies for
  prompt chunks, bfloat16 activations between them (model/layers/prompt_ops.py) and, on a CPU with
  AMX-BF16, the lone prompt's attention in the tile-unit kernel;
- "int8-dot" is also what the one-call decode step's int8-dot copies hold for batches of decode
  steps where AMX tiles make them faster (`CpuDecodeStep.use_batch_copies`: the float32 model's
  weights are the file's int4 values, so quantizing them to int8 requantizes those), here for every
  row count: the copies' worst case.
Greedy agreement with float32 is measured both teacher-forced (the top token at every position of
the text) and free-running (tokens generated one decode step at a time through the paged cache).
The figures of one run are in docs/benchmarks.md; the bounds here are looser than those figures."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from model.cache.batch import PagedBatch, SequenceChunk
from model.families.llama_cpu_step import use_cpu_decode_step
from model.layers import integer_dot, prompt_ops
from model.layers.attention import KernelAttention
from model.layers.cpu_decode_attention import use_cpu_decode_attention
from model.layers.quantized_linear import (BFLOAT16, DOT_FORMATS, INT4, INT8, QuantizedLinear, quantize_model,
                                           replace_module)
from model.loading.gguf_file import load_gguf_model
from tests.default_model import builtin_float32_model, default_gguf_path
from tests.helpers import make_cache

TEXT = Path(__file__).resolve().parents[2] / "data" / "perplexity_text.txt"
PROMPTS = ["The lighthouse keeper opened the door and",
           "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"]
STEPS = 12


@pytest.fixture(scope="module")
def float32():
    return builtin_float32_model()


@pytest.fixture(scope="module")
def text_ids(float32):
    ids = float32.tokenizer.encode(TEXT.read_text())
    assert 400 <= len(ids) <= 600
    return torch.tensor([ids])


def text_nll(model, ids: torch.Tensor, paged: bool = False) -> tuple[float, torch.Tensor]:
    """Mean negative log-likelihood of the text's next tokens, and the top token at every position;
    `paged`: through forward_paged, the text as one prompt chunk returning every position's logits."""
    with torch.inference_mode():
        if paged:
            cache = make_cache(model.config, num_blocks=-(-ids.shape[1] // 16), block_size=16)
            batch = PagedBatch.build([SequenceChunk(ids[0].tolist(), 0, list(range(cache.num_blocks)))], 16)
            batch = dataclasses.replace(batch, logits_index=torch.arange(ids.shape[1]))
            logits = model.forward_paged(batch, cache.layers).float()                 # [T, V]
        else:
            logits = model.forward_full(ids)[0].float()                              # [T, V]
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).mean()
    return float(nll), logits.argmax(-1)


def greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens through forward_paged: the prompt as one chunk, then one-row decode steps."""
    cache = make_cache(model.config, num_blocks=8, block_size=16)
    table, tokens, start, out = list(range(8)), list(prompt), 0, []
    with torch.inference_mode():
        for _ in range(steps):
            chunk = tokens[start:]
            batch = PagedBatch.build([SequenceChunk(chunk, start, table[: -(-len(tokens) // 16)])], 16)
            token = int(model.forward_paged(batch, cache.layers)[-1].argmax())
            start = len(tokens)
            tokens.append(token)
            out.append(token)
    return out


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def reference(float32, text_ids):
    """float32's text NLL, top tokens and greedy continuations of PROMPTS."""
    nll, top = text_nll(float32.model, text_ids)
    runs = [greedy(float32.model, float32.tokenizer.encode(p), STEPS) for p in PROMPTS]
    return nll, top, runs


@pytest.fixture(scope="module")
def kept():
    """The file's own quantization, as `--dtype auto` keeps it: int4 layers, int8 head."""
    return load_gguf_model(default_gguf_path(), quantization="auto").model


def variant_model(variant: str, kept, float32):
    if variant == "auto":
        return kept
    if variant == "auto-c-step":                 # decode steps as `serve` runs them: one C call per step
        model = copy.deepcopy(kept)
        use_cpu_decode_attention(model)
        if not use_cpu_decode_step(model):
            pytest.skip("no C compiler or no AVX512-VNNI here: decode steps run layer by layer")
        return model
    if variant == "auto-bf16-prompt-attention":
        model = copy.deepcopy(kept)
        for module in model.modules():
            if isinstance(module, KernelAttention):
                module.prefill_dtype = torch.bfloat16
        return model
    if variant == "auto-bf16-prompts":           # prompts as `serve` runs them on a CPU with fast bfloat16
        model = copy.deepcopy(kept)
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLinear):
                replace_module(model, name, module.with_formats(module.small_format, module.large_format, BFLOAT16))
        for module in model.modules():
            if isinstance(module, KernelAttention):
                module.prefill_dtype = torch.bfloat16
                module.prompt_tile_attention = prompt_ops.has_tile_attention()
        return model
    if variant == "auto-bf16-copies":
        model = copy.deepcopy(kept)
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLinear):
                replace_module(model, name, module.with_formats(module.small_format, BFLOAT16))
        return model
    if variant == "torch-kernels":
        model = copy.deepcopy(kept)
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLinear) and module.values in DOT_FORMATS:
                replace_module(model, name, module.with_formats(module.values, module.values))
        return model
    model = copy.deepcopy(float32.model)         # the values `--quantization int8` loads: Q4_1 and Q8_0 requantized
    quantize_model(model, INT8)
    return in_dot_formats(model) if variant == "int8-dot" else model


def in_dot_formats(model):
    if not integer_dot.has_vnni():
        pytest.skip("no AVX512-VNNI here: the integer-dot formats' portable loop is too slow for a whole text")
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear) and module.values in DOT_FORMATS:
            dot = DOT_FORMATS[module.values]
            replace_module(model, name, module.with_formats(dot, dot))
    return model


@pytest.mark.parametrize("variant", ["auto", "auto-c-step", "auto-bf16-prompt-attention", "auto-bf16-prompts",
                                     "torch-kernels", "auto-bf16-copies", "int8", "int8-dot"])
def test_perplexity_within_one_percent_of_float32(float32, kept, text_ids, reference, variant):
    model = variant_model(variant, kept, float32)
    layers = [m for m in model.model.layers.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 120 and {m.values for m in layers} == ({INT8} if variant.startswith("int8") else {INT4})
    if variant.endswith("-dot"):
        assert {m.formats for m in [*layers, model.lm_head]} == {(DOT_FORMATS[m.values],) for m in layers} | {("int8-dot",)}
    assert model.lm_head.values == INT8
    base_nll, base_top, expected = reference
    nll, top = text_nll(model, text_ids, paged=variant in ("auto-bf16-prompt-attention", "auto-bf16-prompts"))
    ratio = math.exp(nll - base_nll)
    forced = float((top == base_top).float().mean())
    equal = [agreement(e, greedy(model, float32.tokenizer.encode(p), STEPS)) for p, e in zip(PROMPTS, expected)]
    print(f"{variant}: perplexity {math.exp(nll):.3f} vs float32 {math.exp(base_nll):.3f} (× {ratio:.4f}); "
          f"top-1 agreement {forced:.3f}; greedy tokens equal before the first difference {equal} of {STEPS}")
    assert 0.99 <= ratio <= 1.01
    assert forced >= 0.9
    assert equal[-1] >= 7                          # "The capital of France is Paris." (a wide margin)


@pytest.mark.parametrize("length", [70, 200, None])
def test_padding_a_prompts_rows_changes_no_real_row(kept, float32, text_ids, length, monkeypatch):
    """Prompt steps through the bfloat16 path run their products on the row count rounded up to
    PROMPT_ROW_BUCKET (llama.py: oneDNN compiles a kernel per new row count). The padding rows are
    rows of their own: the real rows' logits and cache rows are those of the unpadded step, bit for
    bit where oneDNN blocks both row counts alike (70 → 96, 200 → 224 rows), within its rounding
    where it does not (the whole text, 464 → 480), and as close to float32 either way."""
    from model.families import llama
    model = variant_model("auto-bf16-prompts", kept, float32)
    ids = text_ids[:, :length]
    rows = ids.shape[1]
    padded = []
    original_cat = torch.cat

    def run(bucket: int):
        monkeypatch.setattr(llama, "PROMPT_ROW_BUCKET", bucket)
        cache = make_cache(model.config, num_blocks=-(-rows // 16), block_size=16)
        with torch.inference_mode():
            batch = PagedBatch.build([SequenceChunk(ids[0].tolist(), 0, list(range(cache.num_blocks)))], 16)
            logits = model.forward_paged(dataclasses.replace(batch, logits_index=torch.arange(rows)), cache.layers)
        return logits.float(), [layer.float() for layer in cache.layers]

    monkeypatch.setattr(torch, "cat", lambda tensors, *a, **k: padded.append([t.shape[0] for t in tensors])
                        or original_cat(tensors, *a, **k))
    got_logits, got_cache = run(32)
    monkeypatch.setattr(torch, "cat", original_cat)
    assert [rows, -rows % 32] in padded                                  # the residual stream was padded
    want_logits, want_cache = run(1)
    if length is not None:
        assert torch.equal(got_logits, want_logits)
        assert all(torch.equal(got, want) for got, want in zip(got_cache, want_cache))
    _, top = text_nll(float32.model, ids)

    def agreement_with_float32(logits):
        return float((logits.argmax(-1) == top).float().mean())
    assert agreement_with_float32(got_logits) >= agreement_with_float32(want_logits) - 0.01
    assert float((got_logits - want_logits).abs().max()) <= 0.02 * float(want_logits.abs().max())
    for got, want in zip(got_cache, want_cache):
        assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max())
