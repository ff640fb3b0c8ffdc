"""The paged, chunked, batched forward equals the oracle at every position (CustomLLM, docs/architecture.md)."""
from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.layers.attention import matmul_shared_context
from tests.helpers import make_cache, paged_logits_chunked, perturbed_model
from tests.oracles.custom_llm_oracle import oracle_logits

CFG = preset("custom-llm-tiny")
BLOCK = 4


@pytest.fixture(scope="module")
def model():
    return perturbed_model(CFG, seed=11, std=0.15)


def sequences(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 30, (count,), generator=g).tolist()
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def assert_matches_oracle(model, seqs, got):
    sd = model.state_dict()
    for seq, logits in zip(seqs, got):
        expected = oracle_logits(sd, CFG, seq)
        err = float((logits.double() - expected).abs().max() / expected.abs().max())
        assert err <= 1e-5, f"sequence of {len(seq)} tokens: relative error {err:.2e}"


@pytest.mark.parametrize("chunk", [1, 7, 10_000], ids=["chunk1", "chunk7", "whole"])
@pytest.mark.parametrize("count", [1, 8])
@torch.no_grad()
def test_paged_equals_oracle(model, chunk, count):
    seqs = sequences(count, seed=chunk + count) if count > 1 else [sequences(1, 99)[0] + [3] * 10]
    assert max(len(s) for s in seqs) > 3 * BLOCK  # crosses several block boundaries
    got = paged_logits_chunked(model, make_cache(CFG, num_blocks=128, block_size=BLOCK), seqs, chunk)
    assert_matches_oracle(model, seqs, got)


@pytest.mark.parametrize("prefix_len", [BLOCK * 2, BLOCK * 3 + 1])
@torch.no_grad()
def test_paged_with_cached_prefix(model, prefix_len):
    seqs = [s for s in sequences(4, seed=5) if len(s) > prefix_len + 2] or [list(range(1, 25))]
    cache = make_cache(CFG, num_blocks=128, block_size=BLOCK)
    # first pass fills the cache; the second recomputes only the suffix on top of the cached prefix
    paged_logits_chunked(model, cache, seqs, chunk_size=100)
    got = paged_logits_chunked(model, cache, seqs, chunk_size=3, prefix_len=prefix_len)
    sd = model.state_dict()
    for seq, logits in zip(seqs, got):
        expected = oracle_logits(sd, CFG, seq)[prefix_len:]
        err = float((logits.double() - expected).abs().max() / expected.abs().max())
        assert err <= 1e-5


def test_a_batch_for_kernels_carries_no_gather_tensors():
    """with_gather=False: the kernel fields are the same, the gather path's are left out."""
    from model.cache.batch import PagedBatch, SequenceChunk
    chunks = [SequenceChunk([7], 9, [3, 1, 4]), SequenceChunk([8], 2, [5])]
    full = PagedBatch.build(chunks, 4, window=3)
    lean = PagedBatch.build(chunks, 4, window=3, with_gather=False)
    assert lean.query_index is None and lean.context_slots is None and lean.attn_mask is None
    for name in ("token_ids", "positions", "slot_mapping", "logits_index", "block_tables", "context_lens"):
        assert torch.equal(getattr(full, name), getattr(lean, name)), name
    assert (lean.max_position, lean.num_seqs, lean.is_decode_only) == (full.max_position, 2, True) == (9, 2, True)


def test_a_context_shared_by_every_head_is_multiplied_without_copies_per_head():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 7, generator=g, dtype=torch.float64)             # [B, Q, H, K]
    heads_major = x.transpose(1, 2)                                           # [B, H, Q, K], not contiguous
    context = torch.randn(3, 7, 9, generator=g, dtype=torch.float64)          # [B, K, C]
    got = matmul_shared_context(heads_major, context)
    assert got.shape == (3, 4, 5, 9)
    assert torch.allclose(got, heads_major @ context[:, None], rtol=1e-12, atol=1e-12)


def test_only_one_fresh_sequence_without_a_window_is_plain_causal(model):
    from model.cache.batch import PagedBatch, SequenceChunk
    fresh = SequenceChunk(list(range(1, 10)), 0, [0, 1, 2])
    assert PagedBatch.build([fresh], BLOCK).plain_causal
    assert not PagedBatch.build([fresh], BLOCK, window=4).plain_causal
    assert not PagedBatch.build([SequenceChunk([5, 6], 9, [0, 1, 2])], BLOCK).plain_causal     # a later chunk
    assert not PagedBatch.build([fresh, SequenceChunk([7, 8], 0, [3])], BLOCK).plain_causal     # two sequences
    # the causal flag and the explicit mask give the same logits
    cache = make_cache(CFG, num_blocks=8, block_size=BLOCK)
    batch = PagedBatch.build([fresh], BLOCK)
    with torch.no_grad():
        flagged = model.forward_paged(batch, cache.layers)
        batch.plain_causal = False
        masked = model.forward_paged(batch, cache.layers)
    assert torch.allclose(flagged, masked, rtol=1e-5, atol=1e-6)
