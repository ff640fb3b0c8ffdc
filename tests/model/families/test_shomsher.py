"""ShomsherLLM: the published shapes, and the paged, chunked, batched forward over
`c_kv`-only cache rows equals the oracle at every position, far past the DeRoPE divisor of 40."""
from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.registry import build_model
from model.families.shomsher import ShomsherConfig, infer_shomsher_config
from tests.helpers import make_cache, paged_logits_chunked, perturbed_model
from tests.oracles.shomsher_oracle import oracle_logits

CFG = preset("shomsher-tiny")
BLOCK = 4
_ORACLE: dict = {}


@pytest.fixture(scope="module")
def model():
    return perturbed_model(CFG, seed=5, std=0.15)


def oracle(model, seq, trap=False):
    key = (id(model), tuple(seq), trap)
    if key not in _ORACLE:
        _ORACLE[key] = oracle_logits(model.state_dict(), model.config, seq, trap=trap)
    return _ORACLE[key]


def rel_err(got, expected) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


def sequences(count: int, seed: int, longest: int = 130) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, longest, (count,), generator=g).tolist()
    lengths[0] = longest  # positions well past the divisor 40
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def test_published_config_shapes_and_parameter_count():
    cfg = preset("shomsher-llm")
    assert isinstance(cfg, ShomsherConfig) and cfg.family == "shomsher"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.num_layers) == (5515, 200, 8, 25, 6)
    assert (cfg.rope_dim, cfg.compressed_dim) == (24, 50)
    assert (cfg.num_experts, cfg.expert_hidden, cfg.top_k_experts) == (4, 800, 1)
    assert (cfg.rope_divisor, cfg.rope_theta, cfg.norm_eps) == (40, 10000, 1e-6)
    assert (cfg.bias_qkv, cfg.max_context) == (False, 256)
    assert cfg.eos_token_id == 0 and cfg.bos_token_id is None
    assert cfg.replace(max_context=1024).max_context == 1024
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 56_606_739
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 347
    a = "t_blocks.5.mhattention."
    assert shapes[a + "W_dkv.weight"] == shapes[a + "W_dq.weight"] == [50, 200]
    assert shapes[a + "W_uk.weight"] == shapes[a + "W_uq.weight"] == [8, 50]
    assert shapes[a + "W_qr.weight"] == shapes[a + "W_kr.weight"] == [192, 50]
    assert shapes[a + "W_uv.weight"] == [200, 50] and shapes[a + "output.bias"] == [200]
    e = "t_blocks.0.ff.moe.experts.3.ffn."
    assert shapes[e + "0.weight"] == [800, 200] and shapes[e + "0.bias"] == [800]
    assert shapes[e + "1.w2.weight"] == [800, 800] and shapes[e + "1.w3.bias"] == [800]
    assert shapes[e + "2.weight"] == [200, 800]
    assert shapes["t_blocks.0.ff.moe.gate.bias"] == [4]
    assert {"t_blocks.0.ln1.scale", "t_blocks.0.ln2.shift", "t_blocks.0.rmsnorm2.scale", "final_ln.shift",
            "lm_head.bias", "tok_emb.weight"} <= set(shapes)
    assert not any(k.endswith(".bias") and ".W_" in k for k in shapes)
    assert cfg.cache_row_width == 50 and cfg.cache_bytes_per_token(2) == 600  # bf16, 6 layers


def test_bias_qkv_adds_a_bias_to_every_projection():
    keys = build_model(preset("shomsher-llm").replace(bias_qkv=True)).state_dict()
    names = ("W_dkv", "W_dq", "W_uk", "W_uv", "W_uq", "W_qr", "W_kr")
    assert all(f"t_blocks.0.mhattention.{n}.bias" in keys for n in names)
    assert len(keys) == 347 + 6 * len(names)


def test_config_inferred_from_the_published_shapes():
    state = build_model(preset("shomsher-llm")).state_dict()
    assert infer_shomsher_config(state) == preset("shomsher-llm")
    biased = build_model(preset("shomsher-llm").replace(bias_qkv=True)).state_dict()
    assert infer_shomsher_config(biased).bias_qkv is True
    with pytest.raises(ValueError, match="head count does not show"):
        infer_shomsher_config(build_model(CFG).state_dict())


@torch.no_grad()
def test_full_forward_equals_oracle(model):
    seqs = [s[:90] for s in sequences(2, seed=3, longest=90)]
    seqs[1] = (seqs[1] * 90)[:90]
    got = model.forward_full(torch.tensor(seqs))
    for seq, logits in zip(seqs, got):
        assert rel_err(logits, oracle(model, seq)) <= 1e-5


@pytest.mark.parametrize("chunk", [1, 7, 10_000], ids=["chunk1", "chunk7", "whole"])
@pytest.mark.parametrize("count", [1, 8])
@torch.no_grad()
def test_paged_equals_oracle(model, chunk, count):
    seqs = sequences(count, seed=count)
    got = paged_logits_chunked(model, make_cache(CFG, num_blocks=256, block_size=BLOCK), seqs, chunk)
    for seq, logits in zip(seqs, got):
        err = rel_err(logits, oracle(model, seq))
        assert err <= 1e-5, f"sequence of {len(seq)} tokens: relative error {err:.2e}"


@pytest.mark.parametrize("prefix_len", [BLOCK * 10, BLOCK * 17 + 3])
@torch.no_grad()
def test_paged_with_cached_prefix(model, prefix_len):
    seqs = [s for s in sequences(4, seed=1) if len(s) > prefix_len + 2]
    assert seqs
    cache = make_cache(CFG, num_blocks=256, block_size=BLOCK)
    paged_logits_chunked(model, cache, seqs, chunk_size=100)
    got = paged_logits_chunked(model, cache, seqs, chunk_size=3, prefix_len=prefix_len)
    for seq, logits in zip(seqs, got):
        assert rel_err(logits, oracle(model, seq)[prefix_len:]) <= 1e-5


@torch.no_grad()
def test_cache_rows_are_c_kv_only(model):
    seq = sequences(1, seed=8, longest=9)[0]
    cache = make_cache(CFG, num_blocks=8, block_size=BLOCK)
    assert cache.layers[0].shape[1] == CFG.compressed_dim
    paged_logits_chunked(model, cache, [seq], chunk_size=4)
    x = model.t_blocks[0].ln1(model.tok_emb(torch.tensor(seq)))
    assert torch.allclose(cache.layers[0][: len(seq)], model.t_blocks[0].mhattention.W_dkv(x))


@torch.no_grad()
def test_biased_projections_equal_oracle():
    cfg = CFG.replace(bias_qkv=True)
    model = perturbed_model(cfg, seed=9, std=0.15)
    seqs = sequences(3, seed=4, longest=60)
    got = paged_logits_chunked(model, make_cache(cfg, num_blocks=128, block_size=BLOCK), seqs, 5)
    for seq, logits in zip(seqs, got):
        assert rel_err(logits, oracle_logits(model.state_dict(), cfg, seq)) <= 1e-5


@torch.no_grad()
def test_rotating_the_rope_block_instead_is_far_off(model):
    """The trap: rotating each head's W_*r block (MLA habit) instead of the first rope_dim dims of
    [W_u* | W_*r] gives a different model; ours matches the right one and not the wrong one."""
    seq = sequences(1, seed=12, longest=120)[0]
    ours = model.forward_full(torch.tensor([seq]))[0]
    right, wrong = oracle(model, seq), oracle(model, seq, trap=True)
    assert rel_err(ours, right) <= 1e-5
    assert rel_err(ours, wrong) > 1e-2
    assert rel_err(wrong[:1], right[:1]) <= 1e-5  # position 0 has no rotation: the traps agree there


@torch.no_grad()
def test_sandwich_norms_wrap_the_sublayer_outputs(model):
    """With every post-norm scale at 0 the sublayers add nothing: logits are final_ln(embedding)
    through the head, whatever the context; with them restored, the context matters again."""
    zeroed = perturbed_model(CFG, seed=5, std=0.15)
    for block in zeroed.t_blocks:
        block.rmsnorm1.scale.zero_()
        block.rmsnorm2.scale.zero_()
    ids = torch.tensor([sequences(1, seed=2, longest=20)[0]])
    expected = zeroed.lm_head(zeroed.final_ln(zeroed.tok_emb(ids)))
    assert torch.allclose(zeroed.forward_full(ids), expected, atol=1e-6)
    assert not torch.allclose(model.forward_full(ids), expected, atol=1e-2)


@torch.no_grad()
def test_top1_routing_takes_exactly_one_expert(model):
    moe = model.t_blocks[0].ff.moe
    x = torch.randn(40, CFG.hidden_size, generator=torch.Generator().manual_seed(0))
    chosen = torch.softmax(moe.gate(x), -1).argmax(-1)
    assert len(set(chosen.tolist())) > 1  # several experts in play
    every = torch.stack([expert(x) for expert in moe.experts], 1)       # [T, E, d]
    expected = every[torch.arange(len(x)), chosen]
    got = moe(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)  # weight 1, no mixing
    runner_up = torch.softmax(moe.gate(x), -1).topk(2).indices[:, 1]
    mixed = 0.5 * expected + 0.5 * every[torch.arange(len(x)), runner_up]
    assert not torch.allclose(got, mixed, atol=1e-2)


@torch.no_grad()
def test_bfloat16_cache_stays_close(model):
    seq = sequences(1, seed=6, longest=70)[0]
    got = paged_logits_chunked(model, make_cache(CFG, num_blocks=64, block_size=BLOCK, dtype=torch.bfloat16),
                               [seq], chunk_size=9)[0]
    assert rel_err(got, oracle(model, seq)) <= 3e-2


def test_seed_checkpoint_with_optimizer_state_loads(tmp_path):
    """The seed's `{"model_state_dict", "optimizer_state_dict"}` file: AdamW moments are ignored, the
    head count comes from the preset."""
    from model.loading.loader import load_model
    source = perturbed_model(CFG, seed=2)
    optimizer = torch.optim.AdamW(source.parameters(), lr=1e-3)
    source.forward_full(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    torch.save({"model_state_dict": source.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "ShomsherLLM_checkpoint.pth")
    loaded = load_model(tmp_path / "ShomsherLLM_checkpoint.pth", preset="shomsher-tiny")
    ids = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded.model.forward_full(ids), source.forward_full(ids))
