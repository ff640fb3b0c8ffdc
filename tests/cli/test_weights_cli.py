"""`customllm weights init` and `weights inspect` for every family, and the same strict key checks
when a checkpoint of any family does not match its model."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from model.config import preset
from model.loading.loader import load_model
from model.loading.state_dict import CheckpointError
from server.cli.main import main as cli_main

FAMILIES = {"custom-llm-tiny": "custom_llm", "shomsher-tiny": "shomsher", "smart-llm-tiny": "smart_llm"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def initialised(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "weights"
    assert cli_main(["weights", "init", "--preset", request.param, "--seed", "2", "--out", str(out)]) == 0
    return request.param, out


def test_init_then_inspect(initialised, capsys):
    name, out = initialised
    capsys.readouterr()
    assert cli_main(["weights", "inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    config = preset(name)
    parameters = sum(p.numel() for p in load_model(out).model.parameters())
    assert f"architecture: {FAMILIES[name]}" in printed
    assert f"parameters: {parameters:,}" in printed
    assert f"cache row per token per layer: {config.cache_row_width} values" in printed
    assert f"cache bytes per token (bfloat16): {config.cache_bytes_per_token(2):,}" in printed
    assert json.loads(printed.split("config: ", 1)[1].splitlines()[0])["num_layers"] == config.num_layers
    per_token = {line.split(":")[0].strip(): int(line.split(":")[1].replace(",", ""))
                 for line in printed.split("weight bytes per token", 1)[1].splitlines()[1:5]}
    assert set(per_token) == {"as stored", "none (float32)", "int8", "int4"}
    none, int8, int4 = per_token["none (float32)"], per_token["int8"], per_token["int4"]
    assert per_token["as stored"] == none > int8 and none >= int4   # (ShomsherLLM-tiny's d 36 takes no int4)


def test_a_mismatched_checkpoint_is_named_key_by_key(initialised, tmp_path):
    name, out = initialised
    state = load_file(str(out / "model.safetensors"))
    missing = sorted(state)[-1]
    misshaped = next(k for k in sorted(state) if state[k].dim() == 2 and k != missing)
    del state[missing]
    state["extra.weight"] = state[misshaped][:1].clone()
    state[misshaped] = state[misshaped][:, :3].contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert message.startswith(f"model.safetensors does not match the {FAMILIES[name]} model: ")
    assert missing in message.split("missing keys: ", 1)[1].split(";")[0]     # (a tied head is named too)
    assert "unexpected keys: extra.weight" in message
    assert f"mis-shaped keys: {misshaped} is [" in message


def test_init_with_a_trained_tokenizer_serves_text_through_the_engine(tmp_path):
    """`--train-tokenizer N`: an N-token byte-level BPE beside the checkpoint, which the loader picks
    up, vocab_size set to N; text round-trips byte for byte and the ChatML template renders."""
    from model.text.tokenizer import load_tokenizer
    from server.cli.tiny_tokenizer import CHAT_TEMPLATE

    out = tmp_path / "tiny"
    assert cli_main(["weights", "init", "--preset", "llama-tiny", "--train-tokenizer", "300",
                     "--out", str(out)]) == 0
    loaded = load_model(out)
    assert loaded.config.vocab_size == 300 and loaded.tokenizer_dir == out
    tokenizer = load_tokenizer(out)
    assert tokenizer.vocab_size == 300
    text = "def step(self):\n    return héllo — 🙂"
    ids = tokenizer.encode(text)
    assert max(ids) < 300 and len(ids) < len(text.encode())     # merges were learned
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == tokenizer.token_to_id("<|im_end|>")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    with pytest.raises(ValueError, match="at least"):
        from server.cli.tiny_tokenizer import train_byte_level_bpe
        train_byte_level_bpe(200, tmp_path / "too-small")
