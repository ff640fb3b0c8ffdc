"""The family records (model/registry.py, one `FAMILY` per model/families/<name>.py): each names its
config class, presets, module class, checkpoint markers and decode kernel, and the loader, the config
parser and the kernel switch ask the records instead of naming families."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import preset
from model.kernels import DECODE_KERNELS, decodes_through_kernels, use_triton_decode_attention
from model.loading.loader import detect_family
from model.loading.state_dict import CheckpointError, count_layers
from model.registry import build_model, families, family, model_class, presets

TINY = {"custom_llm": "custom-llm-tiny", "llama": "llama-tiny", "shomsher": "shomsher-tiny",
        "smart_llm": "smart-llm-tiny"}


def test_one_record_per_family():
    assert list(families()) == ["custom_llm", "llama", "shomsher", "smart_llm"]
    for name, record in families().items():
        assert record.name == name == record.config_class.family
        assert model_class(name) is record.model_class
        assert record.presets and all(type(c) is record.config_class for c in record.presets.values())
        assert record.decode_kernel is None or record.decode_kernel in DECODE_KERNELS
    assert family("shomsher").decode_kernel is None
    with pytest.raises(ValueError, match="unknown model family 'gpt2'"):
        family("gpt2")


def test_presets_are_found_through_the_records():
    assert set(presets()) == {name for record in families().values() for name in record.presets}
    assert preset("custom-llm-973m").num_layers == 30 and preset("smollm2-135m").family == "llama"
    with pytest.raises(ValueError, match="unknown preset 'nope'; known presets: custom-llm-973m"):
        preset("nope")


@pytest.mark.parametrize("name", TINY)
def test_each_checkpoint_is_told_apart_by_its_markers(name):
    state = build_model(preset(TINY[name])).state_dict()
    assert detect_family(state) is family(name)
    assert count_layers(state, {"custom_llm": "decoder_layers.", "llama": "model.layers.", "shomsher": "t_blocks.",
                                "smart_llm": "layers."}[name]) == preset(TINY[name]).num_layers


def test_a_family_may_refuse_a_checkpoint_before_detection():
    state = build_model(preset("custom-llm-tiny")).state_dict()
    state["decoder_layers.0.mlp.shared_experts.0.gate_proj.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="later Assign15 layout"):
        detect_family(state)
    with pytest.raises(CheckpointError, match="cannot tell which model family"):
        detect_family({"encoder.weight": torch.zeros(1)})


def test_a_family_without_a_decode_kernel_keeps_pytorch_attention():
    model = build_model(preset("shomsher-tiny"))
    assert use_triton_decode_attention(model) == 0 and not decodes_through_kernels(model)


def test_model_never_imports_server():
    root = Path(__file__).resolve().parents[2] / "model"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if any(line.lstrip().startswith(("import server", "from server"))
                        for line in p.read_text().splitlines())]
    assert not offenders
