"""Decode steps through torch.compile on the CPU (server/executor/compiled_decode.py): the same
greedy tokens and logprobs as eager steps, one compiled graph per bucket and no recompiles while
serving, the eager fallback when compiling fails, and the models it refuses."""
from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from model.config import preset
from model.layers import cpu_decode_attention as cpu_attention
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from server.executor.compiled_decode import CompiledDecode, make_compiled_decode
from tests.helpers import ByteTokenizer, assert_same_outputs, collect, make_cache, perturbed_model

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler to build the CPU kernel")

LLAMA = preset("llama-tiny")
PROMPTS = [[(5 * i + j) % 512 for i in range(3 + 7 * j)] for j in range(3)]      # 3 sequences → bucket 4


def kernel_model(config=LLAMA):
    model = perturbed_model(config, seed=4, std=0.15)
    assert cpu_attention.use_cpu_decode_attention(model) == config.num_layers
    return model


def run_engine(model, compiled_backend: str | None, buckets=(1, 2, 4), max_tokens=8):
    """Greedy outputs of PROMPTS, and the CompiledDecode (None: eager steps)."""
    cache = make_cache(model.config, num_blocks=40, block_size=4)
    compiled = None
    if compiled_backend is not None:
        compiled = CompiledDecode(model, cache, buckets=buckets, backend=compiled_backend)
        compiled.compile_all()
    engine = Engine(model, cache, ByteTokenizer(model.config.vocab_size), EngineConfig(block_size=4),
                    model_name="tiny", decode_graphs=compiled)
    engine.start()
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=3, ignore_eos=True)

        async def all_of():
            return await asyncio.gather(*(collect(engine, GenerationRequest(f"r{i}", p, params))
                                          for i, p in enumerate(PROMPTS)))
        return asyncio.run(all_of()), compiled
    finally:
        engine.stop()


def counting_runs(monkeypatch):
    runs = []
    original = CompiledDecode.run

    def counted(self, batch):
        out = original(self, batch)
        runs.append((batch.block_tables.shape[0], batch.is_decode_only, out is not None))
        return out
    monkeypatch.setattr(CompiledDecode, "run", counted)
    return runs


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_decode_steps_equal_eager_ones(monkeypatch, backend):
    model = kernel_model()
    plain, _ = run_engine(model, None)
    runs = counting_runs(monkeypatch)
    compiled_results, compiled = run_engine(model, backend)
    assert set(compiled.steps) == {1, 2, 4}
    assert (3, True, True) in runs, "no padded decode step of 3 sequences ran compiled"
    assert all(used for _, decode, used in runs if decode)
    assert_same_outputs(plain, compiled_results, logprob_tol=1e-4)


def test_one_compilation_per_bucket_and_none_while_serving():
    """compile_all compiles each bucket once; steps of growing contexts then run those graphs."""
    from torch._dynamo.testing import CompileCounter

    from model.cache.batch import PagedBatch, SequenceChunk
    torch._dynamo.reset()                               # no graph compiled by an earlier test to reuse
    model = kernel_model()
    cache = make_cache(model.config, num_blocks=40, block_size=4)
    counter = CompileCounter()
    compiled = CompiledDecode(model, cache, buckets=(1, 2), backend=counter)
    assert compiled.compile_all() == 2 and counter.frame_count == 2
    for length in (3, 9, 17):
        for n in (1, 2):
            chunks = [SequenceChunk([7 + i], length, list(range(i * 5, i * 5 + length // 4 + 1))) for i in range(n)]
            logits = compiled.run(PagedBatch.build(chunks, 4, with_gather=False))
            assert logits is not None and logits.shape == (n, model.config.vocab_size)
    assert counter.frame_count == 2


def test_a_failed_compilation_leaves_the_bucket_eager(caplog):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()                               # no graph compiled by an earlier test to reuse
    model = kernel_model()
    cache = make_cache(model.config, num_blocks=40, block_size=4)
    compiled = CompiledDecode(model, cache, buckets=(1, 2), backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="customllm.compiled_decode"):
        assert compiled.compile_all() == 0
    assert "runs eagerly" in caplog.text
    from model.cache.batch import PagedBatch, SequenceChunk
    batch = PagedBatch.build([SequenceChunk([7], 3, [0])], 4, with_gather=False)
    assert compiled.run(batch) is None                 # the runner then runs the model eagerly


def test_models_that_cannot_compile_are_refused():
    plain = perturbed_model(LLAMA)                      # attention through the gather path
    assert make_compiled_decode(plain, make_cache(LLAMA), 4) is None
    moe = kernel_model(preset("custom-llm-tiny"))       # its MoE counts tokens per expert on the host
    assert make_compiled_decode(moe, make_cache(moe.config), 4) is None
