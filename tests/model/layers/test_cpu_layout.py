"""Column-major float32 weights on the CPU (model/layers/cpu_layout.py): the same values in another
layout, so every family decodes the same tokens; a tied head stays tied; 16-bit models are left
alone; `build_engine` applies it on the CPU."""
from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.layers.cpu_layout import linear_weights, use_column_major_weights
from tests.helpers import assert_same_outputs, greedy_outputs_with_and_without, perturbed_model

FAMILIES = {
    "custom-llm-tiny": preset("custom-llm-tiny"),
    "llama-tiny": preset("llama-tiny"),
    "llama-tiny-tied": preset("llama-tiny").replace(tie_word_embeddings=True),
    "shomsher-tiny": preset("shomsher-tiny"),
    "smart-llm-tiny": preset("smart-llm-tiny"),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_weights_change_layout_not_values(name):
    model = perturbed_model(FAMILIES[name], seed=3)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    weights = linear_weights(model)
    assert use_column_major_weights(model) == len(weights) > 0
    for weight in weights:
        assert weight.t().is_contiguous() and not weight.is_contiguous()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], value) for key, value in before.items())
    assert use_column_major_weights(model) == 0                    # a second call moves nothing
    if hasattr(model, "head_weight") and model.config.tie_word_embeddings:
        assert model.head_weight() is model.model.embed_tokens.weight
    if name == "smart-llm-tiny":
        assert model.lm_head.weight is model.token_embedding.weight


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_decodes_the_same_tokens(name):
    config = FAMILIES[name]
    vocab = config.vocab_size
    prompts = [[(11 * i + 5 * j + 1) % vocab for i in range(3 + 7 * j)] for j in range(4)]   # batches of 1-4 rows

    def prepare(model):
        assert use_column_major_weights(model) > 0
    assert_same_outputs(*greedy_outputs_with_and_without(config, prepare, prompts, std=0.2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_stay_row_major(dtype):
    """oneDNN gains nothing from the layout in bfloat16, and float16 GEMMs are far slower with it."""
    model = perturbed_model(preset("llama-tiny"), dtype=dtype)
    assert use_column_major_weights(model) == 0
    assert all(weight.is_contiguous() for weight in linear_weights(model))


def test_build_engine_lays_out_a_float32_model_on_the_cpu(tmp_path):
    from server.executor.build import build_engine
    from tests.api_server import make_tiny_checkpoint, tiny_server_config
    engine = build_engine(tiny_server_config(make_tiny_checkpoint(tmp_path)), start=False)
    assert engine.device.type == "cpu"
    assert all(weight.t().is_contiguous() for weight in linear_weights(engine.model))
