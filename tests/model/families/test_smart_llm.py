"""SmartLLM (docs/architecture.md): the published shapes, the tied head, the seed's config, and the
paged, chunked, batched, windowed forward over [K | V] rows equals the oracle at every position."""
from __future__ import annotations

import pytest
import torch

from model.config import config_from_json, preset
from model.registry import build_model
from model.families.smart_llm import SmartLLMConfig, SmartLLMForCausalLM
from tests.helpers import make_cache, paged_logits_chunked, perturbed_model
from tests.oracles.smart_llm_oracle import oracle_logits
from tests.seed_files import SMART_LLM_MODEL_CONFIG, install_seed_config_module

TINY = preset("smart-llm-tiny")
BLOCK = 4
_ORACLE: dict = {}


def oracle(model, seq):
    key = (id(model), tuple(seq))
    if key not in _ORACLE:
        _ORACLE[key] = oracle_logits(model.state_dict(), model.config, seq)
    return _ORACLE[key]


def rel_err(got, expected) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


def sequences(count: int, seed: int, vocab: int, longest: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, longest, (count,), generator=g).tolist()
    lengths[0] = longest
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def paged_logits(model, cache, seqs, chunk_size, prefix_len=0, release=False):
    return paged_logits_chunked(model, cache, seqs, chunk_size, prefix_len=prefix_len, release_behind_window=release)


VARIANTS = {  # name → overrides of smart-llm-tiny (4 heads)
    "moe-rezero-kv2-w5": dict(sliding_window_size=5),
    "moe-rezero-kv2-w8": dict(sliding_window_size=8),
    "moe-rezero-kv2-wide": dict(sliding_window_size=1000),
    "moe-rezero-kv2-nowindow": dict(use_sliding_window_attention=False),
    "dense-norezero-kv1-w5": dict(use_mixture_of_experts=False, use_rezero=False, n_kv_heads=1, sliding_window_size=5),
    "moe-norezero-kv4-w8": dict(use_rezero=False, n_kv_heads=4, sliding_window_size=8),
    "dense-rezero-kv2-nowindow": dict(use_mixture_of_experts=False, use_sliding_window_attention=False),
    "moe-top1-kv1-w6": dict(num_experts_per_token=1, n_kv_heads=1, sliding_window_size=6),
}
_MODELS: dict = {}


def variant_model(name):
    if name not in _MODELS:
        _MODELS[name] = perturbed_model(TINY.replace(**VARIANTS[name]), seed=7, std=0.15)
    return _MODELS[name]


def test_published_config_shapes_and_parameter_count():
    cfg = preset("smart-llm")
    assert isinstance(cfg, SmartLLMConfig) and cfg.family == "smart_llm"
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.d_ff) == (16000, 512, 8, 1024)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (8, 2, 64)
    assert (cfg.num_experts, cfg.num_experts_per_token, cfg.sliding_window, cfg.use_rezero) == (4, 2, 128, True)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (2, 3)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 76_374_544
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes["token_embedding.weight"] == shapes["lm_head.weight"] == [16000, 512]
    assert shapes["layers.7.attention.wq.weight"] == [512, 512] and shapes["layers.7.attention.wk.weight"] == [128, 512]
    assert shapes["layers.0.attention.wo.weight"] == [512, 512] and shapes["layers.0.mlp.gate.weight"] == [4, 512]
    assert shapes["layers.0.mlp.shared_expert.w3.weight"] == [512, 1024]
    assert shapes["layers.0.mlp.routed_experts.3.w2.weight"] == [1024, 512]
    assert shapes["layers.0.rezero_alpha_attn"] == shapes["layers.0.rezero_alpha_mlp"] == [1]
    assert shapes["ln_f.weight"] == shapes["layers.0.ln1.weight"] == [512]
    assert not any("bias" in k or "rotary" in k for k in shapes)
    assert cfg.cache_row_width == 256 and cfg.cache_bytes_per_token(2) == 4096  # bf16


def test_dense_and_rezero_off_keys():
    keys = set(build_model(TINY.replace(use_mixture_of_experts=False, use_rezero=False)).state_dict())
    assert {"layers.1.mlp.w1.weight", "layers.1.mlp.w2.weight", "layers.1.mlp.w3.weight"} <= keys
    assert not any("rezero" in k or "experts" in k or "gate" in k for k in keys)
    assert TINY.replace(use_sliding_window_attention=False).sliding_window is None


def test_head_is_tied_through_conversion_and_loading():
    model = perturbed_model(TINY, seed=1)
    assert model.lm_head.weight is model.token_embedding.weight
    half = model.to(torch.bfloat16)
    assert half.lm_head.weight is half.token_embedding.weight
    state = {k: v.float().clone() for k, v in model.state_dict().items()}      # two separate tensors
    fresh = build_model(TINY)
    fresh.load_state_dict(state, strict=True, assign=True)
    assert fresh.lm_head.weight is fresh.token_embedding.weight


@pytest.mark.parametrize("keep", [("token_embedding.weight",), ("lm_head.weight",),
                                  ("token_embedding.weight", "lm_head.weight")])
def test_either_tied_key_loads(keep):
    source = perturbed_model(TINY, seed=3)
    state = {k: v.clone() for k, v in source.state_dict().items()
             if k not in ("token_embedding.weight", "lm_head.weight") or k in keep}
    state = SmartLLMForCausalLM.prepare_state_dict(state)
    fresh = build_model(TINY)
    fresh.load_state_dict(state, strict=True, assign=True)
    assert fresh.lm_head.weight is fresh.token_embedding.weight
    assert torch.equal(fresh.token_embedding.weight, source.token_embedding.weight)


def test_differing_tied_keys_are_refused():
    state = {"token_embedding.weight": torch.zeros(4, 2), "lm_head.weight": torch.ones(4, 2)}
    with pytest.raises(ValueError, match="differ"):
        SmartLLMForCausalLM.prepare_state_dict(state)


SEED_FIELDS = dict(vocab_size=32000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=256,
                   dropout=0.1, use_rotary_embeddings=True, use_mixture_of_experts=True, num_experts=4,
                   num_experts_per_token=2, load_balancing_weight=0.01, sliding_window_size=8,
                   router_z_loss_weight=0.001, use_flash_attention=True, use_sliding_window_attention=True,
                   use_rezero=True, layer_drop_prob=0.05, use_gradient_checkpointing=True)


def test_from_seed_config_maps_every_field():
    cfg = SmartLLMConfig.from_seed_config(SEED_FIELDS)
    assert cfg == SmartLLMConfig(vocab_size=32000, hidden_size=64, num_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                                 max_context=256, sliding_window_size=8)
    state = build_model(TINY).state_dict()
    assert SmartLLMConfig.from_seed_config(SEED_FIELDS, state).vocab_size == TINY.vocab_size  # the embedding's rows
    off = {**SEED_FIELDS, "use_sliding_window_attention": False}
    del off["sliding_window_size"]
    assert SmartLLMConfig.from_seed_config(off).sliding_window is None


def test_from_seed_config_names_every_missing_value():
    partial = {k: v for k, v in SEED_FIELDS.items() if k not in ("n_heads", "sliding_window_size")}
    with pytest.raises(ValueError, match=r"does not give n_heads, sliding_window_size \(the weights do not"):
        SmartLLMConfig.from_seed_config(partial)
    with pytest.raises(ValueError, match=r"does not give d_model, n_layers, n_heads, n_kv_heads, d_ff"):
        SmartLLMConfig.from_seed_config({"vocab_size": 10, "use_rezero": True, "use_mixture_of_experts": False,
                                         "sliding_window_size": 4})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rope_scaling'\]"):
        SmartLLMConfig.from_seed_config({**SEED_FIELDS, "rope_scaling": 2})


def test_from_seed_config_fills_from_the_weights():
    state = build_model(TINY.replace(n_kv_heads=1, use_rezero=False)).state_dict()
    cfg = SmartLLMConfig.from_seed_config({"n_heads": 4, "sliding_window_size": 8, "num_experts_per_token": 2}, state)
    assert cfg == TINY.replace(n_kv_heads=1, use_rezero=False, max_context=1024)


def test_config_json_with_seed_names(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"family": "smart_llm", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 1, '
                    '"d_ff": 96, "vocab_size": 512, "max_seq_len": 256, "sliding_window_size": 8, "dropout": 0.1}')
    assert config_from_json(path) == TINY.replace(n_kv_heads=1)
    path.write_text('{"preset": "smart-llm-tiny", "sliding_window_size": 3}')
    assert config_from_json(path).sliding_window == 3


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_paged_equals_oracle(name):
    model = variant_model(name)
    window = model.config.sliding_window
    for count in (1, 8):
        seqs = sequences(count, seed=count, vocab=TINY.vocab_size)
        if window is not None and window < 40:  # the window's edge falls inside blocks and on their boundaries
            edges = {(p - window) % BLOCK for p in range(window, 40)}
            assert 0 in edges and len(edges) > 1
        for chunk in (1, 7, 10_000):
            got = paged_logits(model, make_cache(model.config, num_blocks=128, block_size=BLOCK), seqs, chunk)
            for seq, logits in zip(seqs, got):
                err = rel_err(logits, oracle(model, seq))
                assert err <= 1e-5, f"{count} sequences, chunk {chunk}, {len(seq)} tokens: relative error {err:.2e}"


@pytest.mark.parametrize("name", ["moe-rezero-kv2-w5", "moe-norezero-kv4-w8", "dense-rezero-kv2-nowindow"])
@pytest.mark.parametrize("prefix_len", [BLOCK * 3, BLOCK * 5 + 1])
@torch.no_grad()
def test_paged_with_cached_prefix(name, prefix_len):
    model = variant_model(name)
    seqs = [s for s in sequences(4, seed=5, vocab=TINY.vocab_size) if len(s) > prefix_len + 2]
    cache = make_cache(model.config, num_blocks=128, block_size=BLOCK)
    paged_logits(model, cache, seqs, chunk_size=100)
    got = paged_logits(model, cache, seqs, chunk_size=3, prefix_len=prefix_len)
    for seq, logits in zip(seqs, got):
        assert rel_err(logits, oracle(model, seq)[prefix_len:]) <= 1e-5


@pytest.mark.parametrize("name", ["moe-rezero-kv2-w5", "moe-norezero-kv4-w8"])
@torch.no_grad()
def test_blocks_released_behind_the_window_are_never_read(name):
    model = variant_model(name)
    seqs = sequences(3, seed=9, vocab=TINY.vocab_size)
    for chunk in (1, 6):
        got = paged_logits(model, make_cache(model.config, num_blocks=128, block_size=BLOCK), seqs, chunk,
                           release=True)
        for seq, logits in zip(seqs, got):
            assert rel_err(logits, oracle(model, seq)) <= 1e-5


@torch.no_grad()
def test_window_changes_the_result():
    narrow, wide = variant_model("moe-rezero-kv2-w5"), variant_model("moe-rezero-kv2-wide")
    seq = sequences(1, seed=3, vocab=TINY.vocab_size)[0]
    a, b = narrow.forward_full(torch.tensor([seq]))[0], wide.forward_full(torch.tensor([seq]))[0]
    assert torch.allclose(a[:6], b[:6], atol=1e-6)   # p <= W: the whole past is inside the window
    assert not torch.allclose(a[6:], b[6:], atol=1e-3)


@torch.no_grad()
def test_full_forward_equals_oracle():
    model = variant_model("moe-rezero-kv2-w5")
    seqs = [s[:30] for s in sequences(2, seed=4, vocab=TINY.vocab_size, longest=30)]
    seqs[1] = (seqs[1] * 30)[:30]
    for seq, logits in zip(seqs, model.forward_full(torch.tensor(seqs))):
        assert rel_err(logits, oracle(model, seq)) <= 1e-5


@torch.no_grad()
def test_rezero_alphas_scale_the_sublayers():
    model = perturbed_model(TINY, seed=7, std=0.15)
    for layer in model.layers:
        layer.rezero_alpha_attn.zero_()
        layer.rezero_alpha_mlp.zero_()
    ids = torch.tensor([sequences(1, seed=2, vocab=TINY.vocab_size, longest=12)[0]])
    expected = model.lm_head(model.ln_f(model.token_embedding(ids)))
    assert torch.allclose(model.forward_full(ids), expected, atol=1e-6)


@pytest.fixture
def seed_config_module(monkeypatch):
    """The seed's ModelConfig dataclass in a module named `config`, as SmartLLM's trainer pickles it."""
    return install_seed_config_module(monkeypatch, SMART_LLM_MODEL_CONFIG)


def test_seed_checkpoint_with_pickled_config_loads(tmp_path, seed_config_module):
    """The trainer's `smart_llm_model.pth`: weights, optimizer/scheduler/scaler state, and the config as a
    pickled `config.ModelConfig`, read through the loader's allow-listed stand-in."""
    from model.loading.loader import load_model
    cfg = TINY.replace(n_kv_heads=1, sliding_window_size=6)
    source = perturbed_model(cfg, seed=4)
    seed_cfg = seed_config_module.ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1,
                                              d_ff=96, max_seq_len=256, sliding_window_size=6)
    optimizer = torch.optim.AdamW(source.parameters())
    torch.save({"model_state_dict": source.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": {}, "scaler_state_dict": {}, "config": seed_cfg, "step": 10},
               tmp_path / "smart_llm_model.pth")
    loaded = load_model(tmp_path / "smart_llm_model.pth")
    assert loaded.config == cfg
    assert loaded.model.lm_head.weight is loaded.model.token_embedding.weight
    ids = torch.tensor([list(range(1, 20))])
    with torch.no_grad():
        assert torch.equal(loaded.model.forward_full(ids), source.forward_full(ids))
