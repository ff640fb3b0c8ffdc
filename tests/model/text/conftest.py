"""The built-in model's tokenizer as Hugging Face transformers reads the same GGUF file: the
independent reference the tokenizer and chat-template tests compare against, read once per test
session (it takes seconds; the tests only read it)."""
from __future__ import annotations

import pytest

from tests.default_model import default_gguf_path, hf_offline


@pytest.fixture(scope="session")
def hf_tokenizer():
    hf_offline()
    transformers = pytest.importorskip("transformers")
    path = default_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
