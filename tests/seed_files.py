"""Tokenizer files of the seed systems, built here with the seeds' own pipelines (the `tokenizers`
library as their training code calls it), since the seeds publish no files we could ship."""
from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from model.text.seed_tokenizers import SPECIALS

ENGLISH = [
    "<user>What is the capital of France?<assistant>The capital of France is Paris.",
    "<user>Count from 0 to 9, please.<assistant>0 1 2 3 4 5 6 7 8 9. Done!",
    "<user>Tell me a joke about a quick brown fox.<assistant>The quick brown fox jumps over the lazy dog.",
    "<user>Where is the Café?<assistant>Next to the bakery, on Main Street (2nd floor).",
]
BENGALI = ["আমি বাংলায় গান গাই।<eos>", "বাংলা ভাষা খুব সুন্দর।<eos>", "আজকে সকালে বৃষ্টি হয়েছে!<eos>",
           "তুমি কেমন আছো? আমি ভালো আছি।<eos>"]


def write_smart_bpe(path: Path, all_bytes: bool = False) -> Path:
    """A tiny BPE trained as SmartLLM's SmartBPETokenizer.train_from_texts does: NFD, lowercase,
    strip accents; ByteLevel then single digits; no decoder, no post-processor; its 7 specials first.
    `all_bytes`: every byte in the vocabulary (as a real corpus would give), not only those of the
    few training lines."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(),
                                                       pre_tokenizers.Digits(individual_digits=True)])
    alphabet = pre_tokenizers.ByteLevel.alphabet() if all_bytes else []
    trainer = trainers.BpeTrainer(vocab_size=300 + len(alphabet), special_tokens=list(SPECIALS), min_frequency=2,
                                  initial_alphabet=alphabet)
    tokenizer.train_from_iterator(ENGLISH * 5, trainer)
    tokenizer.save(str(path))
    return path


def write_bengali_bpe(path: Path) -> Path:
    """A ShomsherLLM-style tokenizer (its utils.py pipeline): NFKC, ByteLevel with a prefix space,
    `<eos>` = 0, ByteLevel decoder, no post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.train_from_iterator(BENGALI * 5, trainers.BpeTrainer(vocab_size=150, special_tokens=["<eos>"]))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path))
    return path


# SmartLLM's `config.ModelConfig` (its trainer pickles an instance into the checkpoint): fields, defaults
SMART_LLM_MODEL_CONFIG = {
    "vocab_size": 32000, "d_model": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 2, "d_ff": 1024,
    "max_seq_len": 1024, "dropout": 0.1, "use_rotary_embeddings": True, "use_mixture_of_experts": True,
    "num_experts": 4, "num_experts_per_token": 2, "load_balancing_weight": 0.01, "sliding_window_size": 128,
    "router_z_loss_weight": 0.001, "use_flash_attention": True, "use_sliding_window_attention": True,
    "use_rezero": True, "layer_drop_prob": 0.05, "use_gradient_checkpointing": True,
}


def install_seed_config_module(monkeypatch, fields: dict) -> types.ModuleType:
    """A module named `config` holding a `ModelConfig` dataclass with these fields (name → default),
    importable as `config.ModelConfig`, as the seed's trainer pickles it."""
    module = types.ModuleType("config")
    model_config = dataclasses.make_dataclass(
        "ModelConfig", [(name, type(default), dataclasses.field(default=default)) for name, default in fields.items()])
    model_config.__module__ = "config"
    model_config.__qualname__ = "ModelConfig"
    module.ModelConfig = model_config
    monkeypatch.setitem(sys.modules, "config", module)
    return module
