"""Llama family (docs/architecture.md) on small random weights: the paged, chunked, batched forward
equals the plain full forward at every position, and the full forward equals Hugging Face's
LlamaForCausalLM given the same state dict."""
from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.cache.kv_cache import KVCache
from model.families.llama import LlamaConfig, LlamaForCausalLM
from model.cache.batch import PagedBatch, SequenceChunk
from tests.helpers import make_cache, paged_logits_chunked, perturbed_model

BLOCK = 4
TINY = preset("llama-tiny")
# kv heads 1 (multi-query), 2 (grouped) and = heads (multi-head); one tied variant
CONFIGS = {
    "kv1": TINY.replace(num_kv_heads=1),
    "kv2": TINY.replace(num_kv_heads=2),
    "kv4": TINY.replace(num_kv_heads=4),
    "kv2-tied-g3": TINY.replace(hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=12, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return perturbed_model(CONFIGS[request.param], seed=3, std=0.15)


def random_sequences(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def full_logits(model, seq: list[int]) -> torch.Tensor:
    return model.forward_full(torch.tensor([seq]))[0]                                     # [T, V]


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-5):
    err = float((got - expected).abs().max() / expected.abs().max())
    assert err <= tol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("chunk", [1, 7, 10_000], ids=["chunk1", "chunk7", "whole"])
@torch.no_grad()
def test_paged_equals_full_single_sequence(model, chunk):
    seq = random_sequences([4 * BLOCK + 3], model.config.vocab_size, seed=chunk)[0]       # crosses 4 boundaries
    got = paged_logits_chunked(model, make_cache(model.config, num_blocks=32, block_size=BLOCK), [seq], chunk)
    assert_close(got[0], full_logits(model, seq), f"chunk {chunk}")


@pytest.mark.parametrize("chunk", [1, 7, 10_000], ids=["chunk1", "chunk7", "whole"])
@torch.no_grad()
def test_paged_equals_full_interleaved_sequences(model, chunk):
    """Four sequences of different lengths advance together in the same steps; with chunk 1 every
    step is decode-only (the lean path), otherwise queries are padded per sequence."""
    seqs = random_sequences([23, 5, 14, 31], model.config.vocab_size, seed=10 + chunk)
    got = paged_logits_chunked(model, make_cache(model.config, num_blocks=64, block_size=BLOCK), seqs, chunk)
    for i, (seq, logits) in enumerate(zip(seqs, got)):
        assert_close(logits, full_logits(model, seq), f"sequence {i} ({len(seq)} tokens), chunk {chunk}")


@torch.no_grad()
def test_prefill_then_decode_with_a_cached_prefix_and_scattered_blocks(model):
    """A prefix computed in an earlier step (a prefix-cache hit), non-consecutive blocks, and a step
    that mixes one sequence's prefill chunk with another's decode token; only the last token's logits."""
    cfg = model.config
    a, b = random_sequences([18, 11], cfg.vocab_size, seed=5)
    cache = make_cache(cfg, num_blocks=32, block_size=BLOCK)
    table_a, table_b = [9, 2, 30, 4, 17], [1, 22, 7]
    model.forward_paged(PagedBatch.build([SequenceChunk(a[:8], 0, table_a[:2])], BLOCK), cache.layers)
    model.forward_paged(PagedBatch.build([SequenceChunk(b[:10], 0, table_b)], BLOCK), cache.layers)
    batch = PagedBatch.build([SequenceChunk(a[8:], 8, table_a), SequenceChunk(b[10:], 10, table_b)], BLOCK)
    logits = model.forward_paged(batch, cache.layers)                                       # [2, V]
    assert logits.shape == (2, cfg.vocab_size)
    assert_close(logits[0], full_logits(model, a)[-1], "prefix-hit prefill")
    assert_close(logits[1], full_logits(model, b)[-1], "decode beside a prefill")


@torch.no_grad()
def test_logits_only_for_sequences_that_need_them(model):
    cfg = model.config
    a, b, c = random_sequences([6, 9, 3], cfg.vocab_size, seed=8)
    cache = make_cache(cfg, num_blocks=16, block_size=BLOCK)
    batch = PagedBatch.build([SequenceChunk(a, 0, [0, 1]), SequenceChunk(b, 0, [2, 3, 4], needs_logits=False),
                              SequenceChunk(c, 0, [5])], BLOCK)
    logits = model.forward_paged(batch, cache.layers)
    assert logits.shape == (2, cfg.vocab_size)
    assert_close(logits[0], full_logits(model, a)[-1], "a")
    assert_close(logits[1], full_logits(model, c)[-1], "c")


@torch.no_grad()
def test_cache_rows_are_post_rope_keys_then_values(model):
    """Row layout [K of every kv head, post-RoPE | V of every kv head], as the design fixes it."""
    cfg = model.config
    seq = random_sequences([5], cfg.vocab_size, seed=2)[0]
    cache = KVCache(cfg, num_blocks=4, block_size=BLOCK)
    model.forward_paged(PagedBatch.build([SequenceChunk(seq, 0, [3, 1])], BLOCK), cache.layers)
    sd = model.state_dict()
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(seq)))  # [T, d]
    k = (x @ sd["model.layers.0.self_attn.k_proj.weight"].T).view(len(seq), cfg.num_kv_heads, cfg.head_dim)
    v = x @ sd["model.layers.0.self_attn.v_proj.weight"].T                                 # [T, KV*hd]
    pos = torch.arange(len(seq), dtype=torch.float64)[:, None]
    inv_freq = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    angle = torch.cat([pos * inv_freq, pos * inv_freq], -1).float()                        # [T, hd]
    half = cfg.head_dim // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], -1)
    k_rope = k * angle.cos()[:, None] + rotated * angle.sin()[:, None]
    slots = [3 * BLOCK + i for i in range(BLOCK)] + [1 * BLOCK]
    rows = cache.layers[0][slots]                                                          # [T, 2*KV*hd]
    assert rows.shape[1] == cfg.cache_row_width == 2 * cfg.num_kv_heads * cfg.head_dim
    torch.testing.assert_close(rows[:, : cfg.num_kv_heads * cfg.head_dim], k_rope.flatten(1))
    torch.testing.assert_close(rows[:, cfg.num_kv_heads * cfg.head_dim:], v)


@torch.no_grad()
def test_bfloat16_paged_tracks_float32():
    cfg = CONFIGS["kv2"]
    model = perturbed_model(cfg, seed=4, std=0.15)
    seqs = random_sequences([13, 21, 6], cfg.vocab_size, seed=1)
    exact = paged_logits_chunked(model, make_cache(cfg, num_blocks=32, block_size=BLOCK), seqs, 5)
    low = paged_logits_chunked(model.to(torch.bfloat16),
                               make_cache(cfg, num_blocks=32, block_size=BLOCK, dtype=torch.bfloat16), seqs, 5)
    for e, lo in zip(exact, low):
        assert lo.dtype == torch.bfloat16
        assert_close(lo.float(), e, "bfloat16", tol=0.05)


def test_equals_hugging_face_llama_on_the_same_state_dict(model):
    """An independent implementation: transformers' LlamaForCausalLM loads our state dict as it is
    (the parameter names are Hugging Face's) and gives the same logits."""
    transformers = pytest.importorskip("transformers")
    cfg = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_context, tie_word_embeddings=cfg.tie_word_embeddings)
    hf_config._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    seqs = torch.tensor(random_sequences([40, 40], cfg.vocab_size, seed=6))
    with torch.no_grad():
        assert_close(model.forward_full(seqs), hf(seqs).logits, "transformers LlamaForCausalLM")


def test_config_presets_and_row_width():
    smol = preset("smollm2-135m")
    assert isinstance(smol, LlamaConfig) and smol.family == "llama"
    assert (smol.num_heads, smol.num_kv_heads, smol.head_dim, smol.cache_row_width) == (9, 3, 64, 384)
    assert smol.cache_bytes_per_token(2) == 30 * 384 * 2
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LlamaConfig(num_heads=9, num_kv_heads=2)
    assert LlamaConfig.from_dict({"family": "llama", "num_layers": 2}).num_layers == 2


def test_state_dict_keys_are_hugging_face_names():
    """q/k/v and gate/up run fused, but the state dict splits them under HF's names (separate
    storages, so safetensors can save them) and loading joins them back."""
    tied = LlamaForCausalLM(CONFIGS["kv2-tied-g3"])
    untied = perturbed_model(CONFIGS["kv2"], seed=9)
    sd = untied.state_dict()
    assert "lm_head.weight" not in tied.state_dict() and "lm_head.weight" in sd
    per_layer = {"input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    expected = {f"model.layers.{i}.{name}.weight" for i in range(2) for name in per_layer}
    assert set(sd) == expected | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert sd["model.layers.1.mlp.up_proj.weight"].shape == (96, 64)
    assert len({t.untyped_storage().data_ptr() for t in sd.values()}) == len(sd)
    again = LlamaForCausalLM(CONFIGS["kv2"])
    again.load_state_dict(sd, strict=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in sd.items())
    from safetensors.torch import load, save
    assert set(load(save(sd))) == set(sd)
    assert LlamaForCausalLM.is_ignored_checkpoint_key("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert LlamaForCausalLM.is_ignored_checkpoint_key("model.rotary_emb.inv_freq")
    assert not LlamaForCausalLM.is_ignored_checkpoint_key("model.layers.0.self_attn.q_proj.weight")
