"""Checkpoint loading: every format, wrapper and prefix round-trips; wrong checkpoints give one
clear message; pickles carrying code are refused; allow-listed config stand-ins are read."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from model.loading.checkpoint import read_checkpoint
from model.config import preset
from model.loading.loader import load_model
from model.loading.state_dict import CheckpointError
from tests.helpers import perturbed_model
from tests.seed_files import install_seed_config_module

TINY = preset("custom-llm-tiny")


@pytest.fixture(scope="module")
def state():
    return {k: v.clone() for k, v in perturbed_model(TINY, seed=1).state_dict().items()}


def write_config(directory):
    (directory / "config.json").write_text(json.dumps({"preset": "custom-llm-tiny"}))


def assert_same(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize("wrapper", [None, "model_state_dict", "state_dict"])
@pytest.mark.parametrize("prefix", ["", "model.", "module.", "_orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_pickle_formats_wrappers_and_prefixes_round_trip(tmp_path, state, wrapper, prefix, suffix):
    saved = {prefix + k: v for k, v in state.items()}
    if wrapper:
        saved = {wrapper: saved, "optimizer_state_dict": {"state": {}, "param_groups": []}, "step": 7}
    torch.save(saved, tmp_path / f"ckpt{suffix}")
    write_config(tmp_path)
    assert_same(load_model(tmp_path / f"ckpt{suffix}").model, state)


def test_safetensors_single_sharded_and_directory(tmp_path, state):
    single = tmp_path / "single"
    single.mkdir()
    save_file(state, str(single / "model.safetensors"))
    write_config(single)
    assert_same(load_model(single / "model.safetensors").model, state)
    assert_same(load_model(single).model, state)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(sharded / name))
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    write_config(sharded)
    assert_same(load_model(sharded).model, state)


def test_trainer_directory_never_opens_trainer_state(tmp_path, state):
    save_file(state, str(tmp_path / "model.safetensors"))
    write_config(tmp_path)
    (tmp_path / "optimizer.pt").write_bytes(b"not even a pickle")
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x04garbage")
    assert_same(load_model(tmp_path).model, state)


def test_rotary_buffers_are_ignored_and_give_the_head_count(tmp_path, state):
    saved = dict(state)
    for i in range(TINY.num_layers):
        saved[f"decoder_layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(TINY.rope_dim // 2)
        saved[f"decoder_layers.{i}.self_attn.rotary_emb.cos_cached"] = torch.ones(4, TINY.rope_dim)
    save_file(saved, str(tmp_path / "model.safetensors"))   # no config.json: heads from inv_freq
    loaded = load_model(tmp_path)
    assert loaded.config.num_heads == TINY.num_heads and loaded.config.head_dim == TINY.head_dim
    assert_same(loaded.model, state)


def test_dtype_conversion(tmp_path, state):
    save_file(state, str(tmp_path / "model.safetensors"))
    write_config(tmp_path)
    for dtype in (torch.bfloat16, torch.float16):
        model = load_model(tmp_path, dtype=dtype).model
        assert all(p.dtype == dtype for p in model.parameters())


def test_truncated_checkpoint_message(tmp_path, state):
    save_file(state, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    write_config(tmp_path)
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file \(truncated"):
        load_model(tmp_path)
    torch.save(state, tmp_path / "ckpt.pt")
    raw = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CheckpointError, match=r"ckpt.pt: not a readable PyTorch checkpoint \(truncated"):
        load_model(tmp_path / "ckpt.pt")


def test_mismatched_checkpoint_names_first_missing_unexpected_and_misshaped(tmp_path, state):
    broken = dict(state)
    del broken["lm_head.bias"]
    broken["decoder_layers.0.extra.weight"] = torch.zeros(3)
    broken["token_embeddings.weight"] = torch.zeros(10, TINY.hidden_size)
    save_file(broken, str(tmp_path / "model.safetensors"))
    write_config(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert message.startswith("model.safetensors does not match the custom_llm model: ")
    assert "missing keys: lm_head.bias" in message
    assert "unexpected keys: decoder_layers.0.extra.weight" in message
    assert f"mis-shaped keys: token_embeddings.weight is [10, {TINY.hidden_size}] in the checkpoint but " \
           f"[{TINY.vocab_size}, {TINY.hidden_size}] in the model" in message


class Exploit:
    def __reduce__(self):
        return (print, ("this ran while unpickling",))


def test_pickle_carrying_code_is_refused(tmp_path, state):
    torch.save({"model_state_dict": state, "payload": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil.pt: refused: it holds a pickled print object"):
        read_checkpoint(tmp_path / "evil.pt")


@pytest.fixture
def seed_config_module(monkeypatch):
    """A ModelConfig dataclass in a module named `config`, as SmartLLM's trainer pickles it."""
    return install_seed_config_module(monkeypatch, {"n_heads": 8, "sliding_window_size": 128})


def test_allow_listed_config_is_read_through_a_stand_in(tmp_path, state, seed_config_module):
    torch.save({"model_state_dict": state, "config": seed_config_module.ModelConfig(n_heads=4),
                "optimizer_state_dict": {}}, tmp_path / "smart.pth")
    checkpoint = read_checkpoint(tmp_path / "smart.pth")
    assert checkpoint.embedded_config == {"n_heads": 4, "sliding_window_size": 128}
    assert set(checkpoint.state_dict) == set(state)


def test_other_pickled_classes_are_refused(tmp_path, state, seed_config_module):
    @dataclass
    class Other:
        x: int = 1
    Other.__module__ = "config"
    Other.__qualname__ = "Other"
    seed_config_module.Other = Other
    torch.save({"model_state_dict": state, "config": Other()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"refused: it holds a pickled config.Other object"):
        read_checkpoint(tmp_path / "other.pth")


def test_later_assign15_layout_is_named(tmp_path, state):
    later = {k.replace("mlp.moe.", "mlp."): v for k, v in state.items()}
    save_file(later, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="later Assign15 layout"):
        load_model(tmp_path)


def test_seed_trained_checkpoint_gets_one_warning(tmp_path):
    from model.loading.init_weights import random_model
    untouched = random_model(TINY).state_dict()
    save_file(untouched, str(tmp_path / "model.safetensors"))
    write_config(tmp_path)
    warnings = load_model(tmp_path).warnings
    assert len(warnings) == 1 and "initial values" in warnings[0]

