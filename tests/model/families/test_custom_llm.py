"""CustomLLM-973M computed exactly: oracle vs naive vs absorbed/paged, MoE vs a per-token loop."""
from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.registry import build_model
from tests.helpers import make_cache, paged_logits_chunked, perturbed_model
from tests.oracles.custom_llm_oracle import oracle_logits

TINY = preset("custom-llm-tiny")
REAL_2_LAYERS = preset("custom-llm-973m").replace(num_layers=2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_parameter_count_of_973m():
    model = build_model(preset("custom-llm-973m"), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 973_122_258


def test_cache_row_is_576_and_34560_bytes_per_token_in_bf16():
    cfg = preset("custom-llm-973m")
    assert cfg.cache_row_width == 576
    assert cfg.cache_bytes_per_token(2) == 34_560
    assert cfg.cache_bytes_per_token(4) == 69_120


def test_state_dict_keys_are_the_seeds():
    keys = set(build_model(TINY, device="meta").state_dict())
    for expected in ["token_embeddings.weight", "position_embeddings.weight", "lm_head.weight", "lm_head.bias",
                     "decoder_layers.0.input_norm.weight", "decoder_layers.1.post_attn_norm.weight",
                     "decoder_layers.0.self_attn.kv_proj_d.weight", "decoder_layers.0.self_attn.rope_k.weight",
                     "decoder_layers.0.mlp.moe.shared_experts.0.gate_proj.weight",
                     "decoder_layers.0.mlp.moe.routed_experts.6.down_proj.weight",
                     "decoder_layers.0.mlp.moe.router.weight", "decoder_layers.0.mlp.moe.routing_bias"]:
        assert expected in keys
    assert not any("rotary" in k for k in keys)


@pytest.mark.parametrize("form, seed", [("naive-full", 3), ("absorbed-paged", 4)])
@pytest.mark.parametrize("cfg,std,length", [(TINY, 0.15, 37), (REAL_2_LAYERS, 0.05, 12)],
                         ids=["tiny", "973m-dims-2-layers"])
def test_both_forms_match_the_oracle(form, seed, cfg, std, length):
    """The naive full forward (per-head K/V expanded) and the absorbed paged one (latent cache rows)."""
    model = perturbed_model(cfg, seed=seed, std=std)
    ids = torch.randint(0, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(seed + 2)).tolist()
    expected = oracle_logits(model.state_dict(), cfg, ids)
    with torch.no_grad():
        if form == "naive-full":
            got = model.forward_full(torch.tensor([ids]))[0]
        else:
            got = paged_logits_chunked(model, make_cache(cfg, block_size=4), [ids], chunk_size=length)[0]
    assert rel_err(got, expected) <= 1e-5


def test_absorbed_equals_naive_attention_layer():
    model = perturbed_model(TINY, seed=7, std=0.2)
    attn = model.decoder_layers[0].self_attn
    x = torch.randn(1, 21, TINY.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cos, sin = model._rope(torch.arange(21), x.dtype)
        naive = attn.forward_naive(x, cos, sin)[0]
        cache = make_cache(TINY, block_size=4)
        from model.cache.batch import PagedBatch, SequenceChunk
        batch = PagedBatch.build([SequenceChunk(list(range(21)), 0, list(range(6)))], 4)
        absorbed = attn.forward_absorbed(x[0], cos, sin, batch, cache.layers[0])
    assert rel_err(absorbed, naive) <= 1e-5
    # the cache holds latent rows only: [c_kv | k_rope of every head]
    assert cache.layers[0].shape[1] == TINY.latent_dim + TINY.num_heads * TINY.rope_dim


def test_moe_equals_per_token_loop_over_experts():
    model = perturbed_model(TINY, seed=9, std=0.2)
    moe = model.decoder_layers[1].mlp.moe
    x = torch.randn(33, TINY.hidden_size, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        got = moe(x)
        expected = torch.zeros_like(x)
        for t in range(x.shape[0]):
            s = torch.sigmoid(moe.router(x[t]) + moe.routing_bias)
            top_s, top_e = s.topk(2)
            top_s = top_s / top_s.sum()
            expected[t] = moe.shared_experts[0](x[t]) + sum(
                w * moe.routed_experts[int(e)](x[t]) for w, e in zip(top_s, top_e))
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 40, 300])  # gathered (T*k <= E), all experts, grouped loop
def test_sync_free_moe_routing_equals_the_grouped_loop(num_tokens):
    model = perturbed_model(TINY, seed=5)
    moe = model.decoder_layers[0].mlp.moe
    x = torch.randn(num_tokens, TINY.hidden_size, generator=torch.Generator().manual_seed(num_tokens))
    with torch.no_grad():
        expected = moe(x)
        before = {k: v.clone() for k, v in moe.state_dict().items()}
        moe.use_sync_free_routing()
        got = moe(x)
        # the checkpoint view is unchanged, and the experts' weights are views of the stacked tensors
        assert all(torch.equal(before[k], v) for k, v in moe.state_dict().items())
        assert moe.routed_experts[3].up_proj.weight.data_ptr() == moe._stacked_up[3].data_ptr()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (got - expected).abs().max()
