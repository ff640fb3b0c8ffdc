"""The CPU decode-attention kernel (model/layers/cpu_decode_attention.py) that reads the paged cache in
place: against a float64 reference, against the gather path through every family that has it, and
its fallback when no compiler is there."""
from __future__ import annotations

import copy
import ctypes

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.cache.batch import PagedBatch, SequenceChunk
from model.config import preset
from model.layers import cpu_decode_attention as cpu_attention
from model.layers import native
from tests.helpers import (assert_same_outputs, greedy_outputs_with_and_without, make_cache, paged_logits_chunked,
                           random_tables)
from tests.helpers import perturbed_model

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler to build the kernel")


def rows_of(cache, tables, lens, b, block_size, window):
    """Sequence b's visible rows [K, W] in float64 (the reference's own gather)."""
    n = int(lens[b])
    positions = torch.arange(0 if window is None else max(0, n - 1 - window), n)
    return cache[tables[b, positions // block_size] * block_size + positions % block_size].double()


def gqa_reference(q, cache, tables, lens, block_size, kv_heads, scale, window=None):
    num_seqs, heads, dim = q.shape
    out = torch.zeros(num_seqs, heads, dim, dtype=torch.float64)
    for b in range(num_seqs):
        rows = rows_of(cache, tables, lens, b, block_size, window)
        keys = rows[:, : kv_heads * dim].view(-1, kv_heads, dim)                     # [K, KV, hd]
        values = rows[:, kv_heads * dim:].view(-1, kv_heads, dim)                   # [K, KV, hd]
        for h in range(heads):
            kv = h // (heads // kv_heads)
            out[b, h] = torch.softmax(keys[:, kv] @ q[b, h].double() * scale, 0) @ values[:, kv]
    return out


def mla_reference(q_latent, q_rope, cache, tables, lens, block_size, scale, window=None):
    num_seqs, heads, latent = q_latent.shape
    rope = q_rope.shape[-1]
    out = torch.zeros(num_seqs, heads, latent, dtype=torch.float64)
    for b in range(num_seqs):
        rows = rows_of(cache, tables, lens, b, block_size, window)
        for h in range(heads):
            k_rope = rows[:, latent + h * rope: latent + (h + 1) * rope]
            scores = (rows[:, :latent] @ q_latent[b, h].double() + k_rope @ q_rope[b, h].double()) * scale
            out[b, h] = torch.softmax(scores, 0) @ rows[:, :latent]
    return out


@pytest.fixture(params=["best", "portable"])
def kernel_path(request):
    """The kernel's AVX-512 tasks where the CPU has them (widths multiples of 16), or its portable ones."""
    force = native.function("paged_decode", "paged_decode_force_portable", None, [ctypes.c_int])
    force(int(request.param == "portable"))
    yield request.param
    force(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 6, 21])
@pytest.mark.parametrize("heads,kv_heads,dim,block_size", [(9, 3, 64, 16), (9, 3, 64, 4), (4, 4, 16, 32),
                                                           (6, 2, 24, 16)])
def test_gqa_kernel_equals_reference(kernel_path, dtype, window, heads, kv_heads, dim, block_size):
    """Blocks of 16 and 32 keys: whole groups of 16 scored at once on the AVX-512 path, the rest of
    a block (and blocks of 4) one key at a time; widths not a multiple of 16 take the portable path."""
    gen = torch.Generator().manual_seed(heads * 7 + dim)
    lens = [1, 17, 40, 5, 70]
    tables, num_blocks = random_tables(lens, block_size, window, gen)
    cache = (3 * torch.randn(num_blocks * block_size, 2 * kv_heads * dim, generator=gen)).to(dtype)
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    got = cpu_attention.cpu_paged_gqa_decode(q, cache, tables, torch.tensor(lens), block_size, kv_heads, 0.3, window)
    want = gqa_reference(q, cache, tables, torch.tensor(lens), block_size, kv_heads, 0.3, window)
    assert got.dtype == torch.float32 and got.shape == (len(lens), heads, dim)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("latent,rope,block_size", [(24, 8, 4), (32, 16, 16), (192, 32, 16)])
def test_mla_kernel_equals_reference(kernel_path, dtype, window, latent, rope, block_size):
    gen = torch.Generator().manual_seed(1)
    heads, lens = 3, [9, 1, 30, 49]
    tables, num_blocks = random_tables(lens, block_size, window, gen)
    cache = torch.randn(num_blocks * block_size, latent + heads * rope, generator=gen).to(dtype)
    q_latent = torch.randn(len(lens), heads, latent, generator=gen).to(dtype)
    q_rope = torch.randn(len(lens), heads, rope, generator=gen).to(dtype)
    got = cpu_attention.cpu_paged_mla_decode(q_latent, q_rope, cache, tables, torch.tensor(lens), block_size, 0.25,
                                             window)
    want = mla_reference(q_latent, q_rope, cache, tables, torch.tensor(lens), block_size, 0.25, window)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gqa", "mla"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_a_sequence_gets_the_same_values_in_any_batch(kernel_path, kind, block_size):
    """Alone, a sequence's heads are tasks of their own; in a batch of 8 (two or more per thread) one
    task takes all of a sequence's heads, reading each row once: the same values either way, and
    the reference's."""
    gen = torch.Generator().manual_seed(2)
    lens = [23, 7, 12, 1, 40, 9, 16, 33]
    tables, num_blocks = random_tables(lens, block_size, None, gen)
    heads, latent, rope = 4, 16, 8
    width = 2 * 2 * 16 if kind == "gqa" else latent + heads * rope
    cache = torch.randn(num_blocks * block_size, width, generator=gen)
    q = torch.randn(len(lens), heads, 16, generator=gen)
    q_rope = torch.randn(len(lens), heads, rope, generator=gen)

    def decode(rows: slice) -> torch.Tensor:
        lens_t = torch.tensor(lens[rows])
        if kind == "gqa":
            return cpu_attention.cpu_paged_gqa_decode(q[rows], cache, tables[rows], lens_t, block_size, 2, 0.25)
        return cpu_attention.cpu_paged_mla_decode(q[rows], q_rope[rows], cache, tables[rows], lens_t, block_size, 0.25)

    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        together = decode(slice(None))
        for b in range(len(lens)):
            assert torch.equal(together[b:b + 1], decode(slice(b, b + 1))), b
    finally:
        torch.set_num_threads(threads)
    lens_t = torch.tensor(lens)
    want = gqa_reference(q, cache, tables, lens_t, block_size, 2, 0.25) if kind == "gqa" else \
        mla_reference(q, q_rope, cache, tables, lens_t, block_size, 0.25)
    assert torch.allclose(together.double(), want, rtol=1e-5, atol=1e-5)


FAMILIES = ["llama-tiny", "custom-llm-tiny", "smart-llm-tiny"]


def with_cpu_kernel(model):
    model = copy.deepcopy(model)
    assert cpu_attention.use_cpu_decode_attention(model) == model.config.num_layers
    return model


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_in_place_decode_equals_the_gather_path(name):
    """Decode steps (chunk 1: every step after the first token is decode-only) through the kernel give
    the gather path's logits; SmartLLM's released blocks hold garbage the kernel must not read."""
    config = preset(name)
    plain = perturbed_model(config, seed=5, std=0.15)
    kernel = with_cpu_kernel(plain)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, config.vocab_size, (n,), generator=gen).tolist() for n in (19, 6, 27)]
    release = getattr(config, "sliding_window", None) is not None
    want = paged_logits_chunked(plain, make_cache(config, num_blocks=64), seqs, 1, release_behind_window=release)
    got = paged_logits_chunked(kernel, make_cache(config, num_blocks=64), seqs, 1, release_behind_window=release)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


class _CacheReads(TorchDispatchMode):
    """Counts the aten ops, other than the write of the new rows, that take a cache layer."""

    def __init__(self, cache_layers):
        super().__init__()
        self.pointers = {layer.data_ptr() for layer in cache_layers}
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if "index_copy" not in str(func) and any(t.data_ptr() in self.pointers for t in tensors):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_a_kernel_decode_step_gathers_no_context(name):
    """The gather path copies each sequence's context out of the cache (`aten.index`) in every
    layer; the kernel's step hands the cache to no aten op but the write of its rows."""
    config = preset(name)
    plain = perturbed_model(config, seed=5, std=0.15)
    cache = make_cache(config, num_blocks=16)
    chunks = [SequenceChunk([3], 9, [0, 1, 2]), SequenceChunk([4], 5, [3, 4])]
    window = getattr(config, "sliding_window", None)
    reads = {}
    for label, model, gather in (("plain", plain, True), ("kernel", with_cpu_kernel(plain), False)):
        batch = PagedBatch.build(chunks, 4, window=window, with_gather=gather)
        with _CacheReads(cache.layers) as mode:
            model.forward_paged(batch, cache.layers)
        reads[label] = mode.reads
    assert sum(r.startswith("aten.index.Tensor") for r in reads["plain"]) == config.num_layers
    assert reads["kernel"] == []


def test_engine_outputs_are_the_same_through_the_kernel():
    prompts = [[5, 9, 2, 7, 1, 3], [8] * 11, [4, 2]]
    plain, changed = greedy_outputs_with_and_without(preset("llama-tiny"), cpu_attention.use_cpu_decode_attention,
                                                     prompts)
    assert_same_outputs(plain, changed)


def test_without_a_compiler_the_gather_path_stays(monkeypatch):
    from server.executor.build import resolve_decode_attention
    cpu = torch.device("cpu")
    assert resolve_decode_attention("auto", cpu) == "cpu"
    monkeypatch.setenv("CC", "")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(cpu_attention, "_function", None)
    assert native.load("paged_decode") is None and not cpu_attention.available()
    model = perturbed_model(preset("llama-tiny"))
    assert cpu_attention.use_cpu_decode_attention(model) == 0
    assert resolve_decode_attention("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="C compiler"):
        resolve_decode_attention("cpu", cpu)


def test_a_source_that_does_not_compile_falls_back(monkeypatch, tmp_path):
    (tmp_path / "broken.c").write_text("int f( {")
    monkeypatch.setattr(native, "__file__", str(tmp_path / "__init__.py"))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("CUSTOMLLM_CACHE_DIR", str(tmp_path / "cache"))
    assert native.load("broken") is None


def test_the_kernel_is_one_node_of_a_compiled_graph():
    """Under torch.compile the kernel is the registered op `customllm::paged_decode` (no graph break:
    fullgraph), with the eager call's values."""
    gen = torch.Generator().manual_seed(4)
    lens, block_size = [9, 3], 4
    tables, num_blocks = random_tables(lens, block_size, None, gen)
    cache = torch.randn(num_blocks * block_size, 2 * 2 * 8, generator=gen)
    q = torch.randn(2, 4, 8, generator=gen)
    args = (cache, tables, torch.tensor(lens), block_size, 2, 0.5)

    def step(q):
        return cpu_attention.cpu_paged_gqa_decode(q * 2, *args) + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q), step(q))
