"""Every family's tiny model runs quantized (int8 and int4, `quantize_model` as `--quantization` does at
load) through its oracle: the oracle computes in float64 over the values the quantized layers hold
(each layer's `dense_weight()`), so what is left is the kernels' bfloat16 activations and outputs.

Stated tolerance: every logit within 2 % of the largest logit (float32 itself is held to 1e-5 in
the families' own tests), at every position but where a mixture of experts routes a token
differently: a near-tied top-k (scores 0.7243 / 0.7234 in custom-llm-tiny) can flip under bfloat16
rounding, a discontinuity no tolerance covers, so at most one position in ten (and at least one
per sequence) may exceed it. Both forms are checked: the plain causal forward and the paged one, in
one-token decode steps of two sequences (the small-step format) and in chunks of 7 (the large-step
one), so the absorbed latent attention reads the dequantized weights too. ShomsherLLM-tiny's
d 36 takes int8 only, so int4 runs on the same structure at d 64. Llama has no oracle of its own
here: its float32 twin (held to transformers' LlamaForCausalLM in test_llama.py) is the reference.
"custom-llm-joined" is CustomLLM with its quantized projections of one input joined into one
product each (`fuse_quantized_projections`, as `build_engine` does), at a latent of 32 so that the
query's projections join too."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model.config import preset
from model.layers.quantized_linear import QuantizedLinear, fuse_quantized_projections, quantize_model
from tests.helpers import make_cache, paged_logits_chunked, perturbed_model
from tests.oracles import custom_llm_oracle, shomsher_oracle, smart_llm_oracle

TOLERANCE = 0.02
ORACLES = {"custom_llm": custom_llm_oracle.oracle_logits, "shomsher": shomsher_oracle.oracle_logits,
           "smart_llm": smart_llm_oracle.oracle_logits, "llama": None}
SHOMSHER_D64 = preset("shomsher-tiny").replace(hidden_size=64, compressed_dim=32, expert_hidden=64, rope_dim=14)
JOINED = "custom-llm-joined"
CASES = [("custom-llm-tiny", "int8"), ("custom-llm-tiny", "int4"), (JOINED, "int4"), (JOINED, "int8"), ("llama-tiny", "int8"), ("llama-tiny", "int4"),
         ("smart-llm-tiny", "int8"), ("smart-llm-tiny", "int4"), ("shomsher-tiny", "int8"), ("shomsher-d64", "int4")]


def config_of(name: str):
    if name == JOINED:
        return preset("custom-llm-tiny").replace(latent_dim=32)
    return SHOMSHER_D64 if name == "shomsher-d64" else preset(name)


def float_twin(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """`model` (the float original) with every quantized layer's weight replaced by the values the
    quantized model holds; a tied head becomes a weight of its own (the quantized head's)."""
    twin = copy.deepcopy(model)
    for name, module in quantized.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        owner_name, _, own = name.rpartition(".")
        owner = quantized.get_submodule(owner_name)
        parts = owner.fused_parts(own) if hasattr(owner, "fused_parts") and own in owner.FUSABLE else []
        rows = module.dense_weight().split([n for _, n in parts]) if parts else [module.dense_weight()]
        for (part, _), weight in zip(parts or [(own, 0)], rows):
            twin.get_submodule(f"{owner_name}.{part}" if owner_name else part).weight = nn.Parameter(
                weight.clone(), requires_grad=False)
    return twin


def assert_within(got: torch.Tensor, expected: torch.Tensor, label) -> None:
    """[T, V] logits: each position within TOLERANCE of the largest logit, but for routing flips."""
    per_position = (got.double() - expected.double()).abs().amax(-1) / expected.double().abs().max()
    outside = int((per_position > TOLERANCE).sum())
    assert outside <= max(1, len(per_position) // 10), (label, per_position.tolist())


@pytest.mark.parametrize("name,kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_quantized_family_matches_its_oracle(name, kind):
    cfg = config_of(name)
    original = perturbed_model(cfg, seed=3, std=0.15)
    model = copy.deepcopy(original)
    assert quantize_model(model, kind) > 0
    if name == JOINED:
        assert fuse_quantized_projections(model) == cfg.num_layers * (2 + cfg.num_shared_experts + cfg.num_routed_experts)
    twin = float_twin(original, model)
    generator = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=generator).tolist() for n in (23, 11)]
    oracle = ORACLES[cfg.family]
    with torch.no_grad():
        expected = [oracle(twin.state_dict(), cfg, s) if oracle else twin.forward_full(torch.tensor([s]))[0]
                    for s in seqs]
        assert_within(model.forward_full(torch.tensor([seqs[0]]))[0], expected[0], "full")
        for chunk in (1, 7):
            paged = paged_logits_chunked(model, make_cache(cfg, num_blocks=32, block_size=4), seqs, chunk)
            for got, want in zip(paged, expected):
                assert_within(got, want, chunk)
    # the twin is what the oracle saw: the quantized values, not the original float weights
    assert any(not torch.equal(p, q) for p, q in zip(original.parameters(), twin.parameters()))
