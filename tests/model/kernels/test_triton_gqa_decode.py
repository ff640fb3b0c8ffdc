"""The Triton paged grouped-query decode kernel against a float64 reference and through the engine
(Llama and SmartLLM families), in Triton's interpreter on the CPU; `gpu` tests on the real shapes."""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton", reason="pip install triton (interprets on the CPU)")

from model.config import preset  # noqa: E402
from model.kernels import use_triton_decode_attention  # noqa: E402
from model.kernels.paged_gqa_decode import paged_gqa_decode  # noqa: E402
from model.layers.moe import use_sync_free_moe  # noqa: E402
from server.executor.decode_graphs import graph_capturable  # noqa: E402
from tests.helpers import (assert_same_outputs, greedy_outputs_with_and_without, random_tables,  # noqa: E402
                           tiny_engine)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, cache, tables, lens, block_size, kv_heads, scale, window=None):
    num_seqs, heads, dim = q.shape
    group = heads // kv_heads
    out = torch.zeros(num_seqs, heads, dim, dtype=torch.float64)
    for b in range(num_seqs):
        n = int(lens[b])
        positions = torch.arange(0 if window is None else max(0, n - 1 - window), n)
        rows = cache[tables[b, positions // block_size] * block_size + positions % block_size].double()
        keys = rows[:, : kv_heads * dim].view(-1, kv_heads, dim)                   # [K, KV, hd]
        values = rows[:, kv_heads * dim:].view(-1, kv_heads, dim)
        for h in range(heads):
            scores = keys[:, h // group] @ q[b, h].double() * scale               # [K]
            out[b, h] = torch.softmax(scores, 0) @ values[:, h // group]
    return out


def random_case(heads, kv_heads, dim, lens, block_size, dtype, window=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = random_tables(lens, block_size, window, gen)
    cache = torch.randn(num_blocks * block_size, 2 * kv_heads * dim, generator=gen).to(dtype)
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    return q, cache, tables, torch.tensor(lens)


def run(case, block_size, kv_heads, scale, window=None, num_splits=None):
    q, cache, tables, lens = (t.to(DEVICE) for t in case)
    return paged_gqa_decode(q, cache, tables, lens, block_size, kv_heads, scale, window, num_splits).cpu()


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 1, 16), (4, 4, 16), (6, 2, 24)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_equals_reference(heads, kv_heads, dim, num_splits):
    """SmolLM2's 9 heads over 3 kv heads, one kv head, as many kv heads as heads, a head dim off the tiles."""
    case = random_case(heads, kv_heads, dim, [1, 17, 70], block_size=16, dtype=torch.float32)
    got = run(case, 16, kv_heads, 0.125, num_splits=num_splits)
    want = reference(*case, 16, kv_heads, 0.125)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), (got.double() - want).abs().max()


@pytest.mark.parametrize("window", [5, 8, 40])
def test_kernel_with_a_sliding_window_and_released_blocks(window):
    case = random_case(4, 2, 16, [3, 50, 97], block_size=8, dtype=torch.float32, window=window, seed=1)
    got = run(case, 8, 2, 0.25, window=window, num_splits=2)
    assert torch.allclose(got.double(), reference(*case, 8, 2, 0.25, window=window), rtol=1e-5, atol=1e-5)


def test_kernel_in_float16():
    case = random_case(9, 3, 64, [5, 40], block_size=16, dtype=torch.float16, seed=2)
    got = run(case, 16, 3, 0.125, num_splits=2)
    assert torch.allclose(got.double(), reference(*case, 16, 3, 0.125), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", ["llama-tiny", "smart-llm-dense-tiny"])
def test_engine_decodes_the_same_tokens_with_the_kernel(name):
    config = preset("smart-llm-tiny").replace(use_mixture_of_experts=False) if name.startswith("smart") \
        else preset(name)

    def prepare(model):
        assert use_triton_decode_attention(model) == config.num_layers
        assert graph_capturable(model)                  # no MoE: the decode step can be captured
    prompts = [[(7 * i + j) % 512 for i in range(5 + 9 * j)] for j in range(3)]
    assert_same_outputs(*greedy_outputs_with_and_without(config, prepare, prompts, std=0.2))


def test_smart_llm_with_moe_is_capturable_once_it_routes_sync_free():
    engine = tiny_engine(config=preset("smart-llm-tiny"), num_blocks=8, block_size=4)
    try:
        use_triton_decode_attention(engine.model)
        assert not graph_capturable(engine.model)          # its MoE counts tokens per expert on the host
        assert use_sync_free_moe(engine.model) == preset("smart-llm-tiny").num_layers
        assert graph_capturable(engine.model)
    finally:
        engine.stop()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_on_the_gpu_smollm2_shapes(dtype):
    case = random_case(9, 3, 64, [1024, 700, 1, 333] * 16, block_size=16, dtype=dtype, seed=3)
    got = run(case, 16, 3, 0.125)
    assert torch.allclose(got.double(), reference(*case, 16, 3, 0.125), rtol=2e-2, atol=2e-2)
