"""The Triton paged MLA decode kernel against PyTorch: on the CPU under TRITON_INTERPRET=1 (set in
tests/conftest.py when there is no CUDA), on the GPU natively, with the 973M model's real shapes
(12 heads, latent 192, RoPE 12 x 32: 576-wide rows) and the tiny model's."""
from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="pip install triton (interprets on the CPU)")

from model.cache.block_pool import RELEASED  # noqa: E402
from model.config import preset  # noqa: E402
from model.kernels import use_triton_decode_attention  # noqa: E402
from model.kernels.paged_mla_decode import block_diagonal_rope_query, merge_splits, paged_mla_decode  # noqa: E402
from tests.helpers import assert_same_outputs, greedy_outputs_with_and_without  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q_latent, q_rope, cache, tables, lens, block_size, scale, window=None):
    """Per sequence: gather its rows, score [c_kv | own head's k_rope], softmax, mix c_kv rows."""
    num_seqs, heads, latent = q_latent.shape
    rope = q_rope.shape[-1]
    out = torch.zeros(num_seqs, heads, latent, dtype=torch.float64)
    for b in range(num_seqs):
        n = int(lens[b])
        first = 0 if window is None else max(0, n - 1 - window)
        positions = torch.arange(first, n)
        slots = tables[b, positions // block_size] * block_size + positions % block_size
        rows = cache[slots].double()                                             # [K, L + H*R]
        k_lat, k_rope = rows[:, :latent], rows[:, latent:].view(-1, heads, rope)
        scores = (q_latent[b].double() @ k_lat.T + torch.einsum("hr,khr->hk", q_rope[b].double(), k_rope)) * scale
        out[b] = torch.softmax(scores, -1) @ k_lat
    return out


def random_case(heads, latent, rope, lens, block_size, dtype, window=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lens) + 1
    num_blocks = len(lens) * max_blocks + 3
    cache = torch.randn(num_blocks * block_size, latent + heads * rope, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)                             # scattered blocks
    tables = torch.full((len(lens), max_blocks), -1, dtype=torch.long)
    for b, n in enumerate(lens):
        used = -(-n // block_size)
        tables[b, :used] = perm[b * max_blocks: b * max_blocks + used]
        if window is not None:                                                   # released behind the window
            gone = max(0, n - 1 - window) // block_size
            tables[b, :gone] = RELEASED
    q_latent = torch.randn(len(lens), heads, latent, generator=gen).to(dtype)
    q_rope = torch.randn(len(lens), heads, rope, generator=gen).to(dtype)
    return q_latent, q_rope, cache, tables, torch.tensor(lens)


def run(case, block_size, scale, window=None, num_splits=None):
    q_latent, q_rope, cache, tables, lens = (t.to(DEVICE) for t in case)
    return paged_mla_decode(q_latent, q_rope, cache, tables, lens, block_size, scale, window, num_splits).cpu()


SHAPES = {"973m": (12, 192, 32), "tiny": (4, 16, 8)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_equals_reference_float32(shape, num_splits):
    heads, latent, rope = SHAPES[shape]
    lens = [1, 17, 70, 33]                         # one key only; block edges; several key tiles
    case = random_case(heads, latent, rope, lens, block_size=16, dtype=torch.float32)
    scale = 1 / math.sqrt(64)
    got = run(case, 16, scale, num_splits=num_splits)
    want = reference(*case, 16, scale)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), (got.double() - want).abs().max()


@pytest.mark.parametrize("window", [5, 16, 40])    # inside a block, on a boundary, wider than a tile
def test_kernel_with_a_sliding_window_and_released_blocks(window):
    heads, latent, rope = SHAPES["tiny"]
    lens = [3, 50, 97]
    case = random_case(heads, latent, rope, lens, block_size=8, dtype=torch.float32, window=window, seed=1)
    got = run(case, 8, 0.25, window=window, num_splits=2)
    want = reference(*case, 8, 0.25, window=window)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), (got.double() - want).abs().max()


def test_kernel_in_float16():
    """16-bit rows and queries, float32 accumulation (bfloat16 is checked on the GPU)."""
    case = random_case(12, 192, 32, [5, 40, 77], block_size=16, dtype=torch.float16, seed=4)
    got = run(case, 16, 0.125, num_splits=2)
    assert torch.allclose(got.double(), reference(*case, 16, 0.125), rtol=2e-3, atol=2e-3)


def test_more_heads_than_one_group():
    lens = [9, 40]
    case = random_case(20, 32, 8, lens, block_size=4, dtype=torch.float32, seed=2)   # 2 groups of 16
    got = run(case, 4, 0.2, num_splits=2)
    assert torch.allclose(got.double(), reference(*case, 4, 0.2), rtol=1e-5, atol=1e-5)


def test_block_diagonal_query_and_merge():
    q = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    bd = block_diagonal_rope_query(q)                                            # [2, 3, 6]
    assert torch.equal(bd[1, 2], torch.tensor([0, 0, 0, 0, 10, 11.]))
    # two slices of one softmax, one of them empty
    scores = torch.tensor([1.0, 2.0, 3.0])
    values = torch.tensor([[1.0], [2.0], [4.0]])
    m = torch.tensor([[[2.0], [float("-inf")], [3.0]]])                          # [B=1, S=3, H=1]
    l = torch.tensor([[[math.exp(-1) + 1], [0.0], [1.0]]])
    acc = torch.stack([torch.tensor([[math.exp(-1) * 1 + 2]]), torch.zeros(1, 1), torch.tensor([[4.0]])])[None]
    expected = (torch.softmax(scores, 0)[:, None] * values).sum(0)
    assert torch.allclose(merge_splits(acc, m, l)[0, 0], expected)


def test_engine_decodes_the_same_tokens_with_the_kernel():
    """custom-llm-tiny through the whole engine: greedy tokens and logprobs with the kernel on decode
    steps equal the PyTorch path's."""
    config = preset("custom-llm-tiny")

    def prepare(model):
        assert use_triton_decode_attention(model) == config.num_layers
    prompts = [[(7 * i + j) % 512 for i in range(5 + 9 * j)] for j in range(3)]
    assert_same_outputs(*greedy_outputs_with_and_without(config, prepare, prompts))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_on_the_gpu_in_16_bit(dtype):
    heads, latent, rope = SHAPES["973m"]
    lens = [1024, 700, 1, 333] * 16                # 64 sequences at the benchmark's context
    case = random_case(heads, latent, rope, lens, block_size=16, dtype=dtype, seed=3)
    got = run(case, 16, 0.125)
    want = reference(*case, 16, 0.125)
    assert torch.allclose(got.double(), want, rtol=2e-2, atol=2e-2)


def test_choosing_the_decode_attention(monkeypatch):
    from server.executor.build import resolve_decode_attention
    cpu = torch.device("cpu")
    assert resolve_decode_attention("torch", cpu) == "torch"
    # the interpreter is for tests only: auto on the CPU is the C kernel (or torch without a compiler,
    # tests/model/layers/test_cpu_decode_attention.py)
    assert resolve_decode_attention("auto", cpu) in ("cpu", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_decode_attention("triton", cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CUDA"):
        resolve_decode_attention("triton", cpu)
    with pytest.raises(ValueError, match="auto, torch, triton or cpu"):
        resolve_decode_attention("flash", cpu)
