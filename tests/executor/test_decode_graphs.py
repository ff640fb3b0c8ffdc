"""Decode steps through DecodeGraphs' static, padded buffers: on the CPU the same buffers and forward
run eagerly (the kernel in Triton's interpreter), so padding, bucket choice and the reserved scratch
block are checked here; the `gpu` test captures real CUDA graphs and compares them with eager steps."""
from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("triton", reason="pip install triton (interprets on the CPU)")

from model.config import preset  # noqa: E402
from model.kernels import use_triton_decode_attention  # noqa: E402
from model.kernels.grouped_moe import grouped_moe  # noqa: E402
from model.layers.moe import use_sync_free_moe  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.executor.decode_graphs import (DecodeGraphs, buckets_up_to, graph_capturable,  # noqa: E402
                                           make_decode_graphs)
from server.engine.engine import Engine  # noqa: E402
from server.engine.request import GenerationRequest, SamplingParams  # noqa: E402
from tests.helpers import ByteTokenizer, collect, make_cache, perturbed_model  # noqa: E402

TINY = preset("custom-llm-tiny")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fast_path_model(config=TINY):
    model = perturbed_model(config, seed=4, std=0.15).to(DEVICE)
    assert not graph_capturable(model)
    use_triton_decode_attention(model)
    if config.family == "custom_llm":
        assert not graph_capturable(model)          # the MoE still syncs to count tokens per expert
        assert use_sync_free_moe(model, grouped_gemm=grouped_moe) == config.num_layers
    assert graph_capturable(model)
    return model


def run_engine(model, graphs: bool, prompts, max_tokens=10):
    cache = make_cache(model.config, num_blocks=40, block_size=4)
    cache.layers = [layer.to(DEVICE) for layer in cache.layers]
    decode_graphs = DecodeGraphs(model, cache, buckets=(1, 2, 4, 8),
                                 use_cuda_graphs=DEVICE == "cuda") if graphs else None
    if decode_graphs is not None and DEVICE == "cuda":
        decode_graphs.capture()
    engine = Engine(model, cache, ByteTokenizer(model.config.vocab_size), EngineConfig(block_size=4), model_name="tiny",
                    device=DEVICE, decode_graphs=decode_graphs)
    engine.start()
    try:
        if graphs:
            assert engine.kv.pool.num_blocks == 39                  # the scratch block is never handed out
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=3, ignore_eos=True)

        async def all_of():
            return await asyncio.gather(*(collect(engine, GenerationRequest(f"r{i}", p, params))
                                          for i, p in enumerate(prompts)))
        results = asyncio.run(all_of())
        engine.flush_inbox()
        engine.check_integrity()
        return results, decode_graphs
    finally:
        engine.stop()


@pytest.mark.parametrize("name", ["custom-llm-tiny", "llama-tiny"])
def test_padded_static_decode_steps_equal_plain_ones(monkeypatch, name):
    model = fast_path_model(preset(name))
    prompts = [[(5 * i + j) % 512 for i in range(3 + 7 * j)] for j in range(3)]     # 3 sequences → bucket 4
    plain, _ = run_engine(model, graphs=False, prompts=prompts)
    runs = []
    original = DecodeGraphs.run

    def counted(self, batch):
        out = original(self, batch)
        runs.append((batch.block_tables.shape[0], batch.is_decode_only, out is not None))
        return out
    monkeypatch.setattr(DecodeGraphs, "run", counted)
    padded, graphs = run_engine(model, graphs=True, prompts=prompts)
    assert any(n == 3 and used for n, _, used in runs), "no padded decode step ran through the static buffers"
    assert all(used for _, decode, used in runs if decode)         # every decode step did
    for (p_out, _, p_tokens), (g_out, _, g_tokens) in zip(plain, padded):
        assert p_tokens == g_tokens
        for a, b in zip([lp for o in p_out for lp in o.logprobs], [lp for o in g_out for lp in o.logprobs]):
            assert abs(a.logprob - b.logprob) <= 1e-4
    assert graphs.bucket_for(3) == 4 and graphs.bucket_for(9) is None


def test_buckets_follow_the_servers_batch_limit():
    assert buckets_up_to(64) == (1, 2, 4, 8, 16, 32, 64)
    assert buckets_up_to(48) == (1, 2, 4, 8, 16, 32, 64)
    assert buckets_up_to(1) == (1,)
    assert buckets_up_to(1000) == (1, 2, 4, 8, 16, 32, 64, 128, 256)     # larger batches run eagerly


def test_batches_it_cannot_run_fall_back():
    model = fast_path_model()
    cache = make_cache(TINY, num_blocks=8, block_size=4)
    graphs = DecodeGraphs(model, cache, buckets=(1, 2), use_cuda_graphs=False)
    from model.cache.batch import PagedBatch, SequenceChunk
    prefill = PagedBatch.build([SequenceChunk([1, 2, 3], 0, [0])], 4)
    assert graphs.run(prefill) is None
    three = PagedBatch.build([SequenceChunk([1], 0, [b]) for b in range(3)], 4)
    assert graphs.run(three) is None                               # past the largest bucket


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_decode():
    model = fast_path_model()
    prompts = [[(5 * i + j) % 512 for i in range(3 + 7 * j)] for j in range(5)]
    plain, _ = run_engine(model, graphs=False, prompts=prompts, max_tokens=20)
    captured, graphs = run_engine(model, graphs=True, prompts=prompts, max_tokens=20)
    assert set(graphs.graphs) == {1, 2, 4, 8}
    for (_, _, a), (_, _, b) in zip(plain, captured):
        assert a == b


@pytest.mark.parametrize("name,capturable", [("custom-llm-tiny", True), ("llama-tiny", True),
                                              ("smart-llm-tiny", True), ("shomsher-tiny", False)])
def test_what_the_server_builds_for_each_family(name, capturable):
    """make_decode_graphs as build_engine calls it on CUDA, run eagerly: MoEs switched to sync-free
    routing, buckets from --max-num-seqs, the last block as scratch; ShomsherLLM (no attention
    kernel) stays eager."""
    config = preset(name)
    model = perturbed_model(config, seed=1)
    use_triton_decode_attention(model)
    cache = make_cache(config, num_blocks=20, block_size=4)
    graphs = make_decode_graphs(model, cache, max_num_seqs=6, capture=False)
    assert (graphs is not None) == capturable
    if graphs is None:
        return
    assert graphs.buckets == (1, 2, 4, 8) and graphs.scratch_slot == 19 * 4
    engine = Engine(model, cache, ByteTokenizer(config.vocab_size), EngineConfig(block_size=4, max_num_seqs=6),
                    model_name="tiny", decode_graphs=graphs)
    engine.start()
    try:
        assert engine.kv.pool.num_blocks == 19
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        _, _, tokens = asyncio.run(collect(engine, GenerationRequest("r", [3, 1, 4, 1, 5], params)))
        with torch.no_grad():
            seq = [3, 1, 4, 1, 5]
            for token in tokens:
                assert token == int(model.forward_full(torch.tensor([seq]))[0, -1].argmax())
                seq.append(token)
        engine.flush_inbox()
        engine.check_integrity()
    finally:
        engine.stop()
