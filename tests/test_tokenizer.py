"""The GGUF-built tokenizer equals Hugging Face's tokenizer of the same GGUF on varied text."""
from __future__ import annotations

import json
import os
import random
import re

import pytest

from model.builtin import builtin_model_path
from model.tokenizer import TextTokenizer, load_tokenizer

BASE = [
    "Hello world", "Hello, World!", "  leading spaces", "trailing spaces   ", "\n\nnewlines\n\n\n", "\ttabs\tand\tmore",
    "12345", "3.14159265", "1,000,000 dollars", "2026-11-24T10:00:00Z", "0x1F 0b1010 1e-9", "version 2.13.0",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "中文字符测试", "日本語のテキスト", "한국어 문장", "café naïve façade", "Ünïcödé ñ ß ø",
    "Здравствуйте, мир", "مرحبا بالعالم", "नमस्ते दुनिया", "def f(x):\n    return x ** 2  # square",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }", "<html><body class=\"x\">hi</body></html>", "SELECT * FROM t;",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "a<|im_end|>b", "don't won't it's",
    "ALL CAPS SHOUTING", "MiXeD cAsE", "snake_case_name camelCaseName", "https://example.com/path?q=1&r=2",
    "user@example.com", "$100 & 50% off!!!", "    indented code", "line1\r\nline2\r\n", "...---...", "~!@#$%^&*()_+",
    "       ", "a  b   c    d", "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "math: ∑∫√∞≠≤", "¯\\_(ツ)_/¯",
]


def corpus() -> list[str]:
    rng = random.Random(7)
    pieces = BASE + ["word", " ", "\n", "42", "🎉", "é", "中", "(", ")", "  ", "\t", "The", "ing", "0"]
    texts = list(BASE)
    while len(texts) < 240:
        texts.append("".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12))))
    return texts


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(builtin_model_path())


@pytest.fixture(scope="module")
def theirs():
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    path = builtin_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_ids_equal_hugging_face_with_the_smollm_pre_tokenizer(ours, theirs):
    """Hugging Face's vocabulary and merges from the same GGUF, split as SmolLM2's own tokenizer.json
    (and llama.cpp's `smollm` pre-tokenizer) split: every digit on its own, then GPT-2's byte-level
    rule. All 240 strings must give the same ids."""
    from tokenizers import Tokenizer, pre_tokenizers
    reference = Tokenizer.from_str(theirs.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    texts = corpus()
    assert len(texts) >= 200
    mismatches = [t for t in texts if ours.encode(t) != reference.encode(t, add_special_tokens=False).ids]
    assert not mismatches, f"{len(mismatches)} differ, e.g. {mismatches[:3]!r}"


def test_ids_equal_plain_hugging_face_gguf_tokenizer(ours, theirs):
    """transformers' GGUF converter ignores the `smollm` pre-tokenizer type, so it differs from the
    model's tokenizer only where a digit follows several spaces; everywhere else the ids are equal."""
    texts = [t for t in corpus() if not re.search(r"\s\s\d", t)]
    assert len(texts) >= 200
    mismatches = [t for t in texts if ours.encode(t) != theirs.encode(t, add_special_tokens=False)]
    assert not mismatches, f"{len(mismatches)} differ, e.g. {mismatches[:3]!r}"


def test_ids_equal_llama_cpp_where_installed(ours):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(builtin_model_path()), vocab_only=True, verbose=False)
    mismatches = [t for t in corpus() if llm.tokenize(t.encode(), add_bos=False, special=True) != ours.encode(t)]
    assert not mismatches, f"{len(mismatches)} differ, e.g. {mismatches[:3]!r}"


def test_decode_round_trips(ours):
    for text in corpus():
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_special_ids_and_no_bos(ours):
    assert (ours.bos_token_id, ours.eos_token_id, ours.vocab_size) == (1, 2, 49152)
    assert ours.encode("<|im_start|>")[0] == 1 and ours.encode("hi")[0] != 1
    assert ours.decode([1, 19556, 2]) == "Hello"


def test_tokenizer_json_loads_the_same(ours, tmp_path):
    (tmp_path / "tokenizer.json").write_text(ours.tokenizer.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "x"}))
    again = load_tokenizer(tmp_path)
    assert isinstance(again, TextTokenizer) and again.eos_token_id == 2 and again.chat_template == "x"
    for text in corpus()[:50]:
        assert again.encode(text) == ours.encode(text)


def test_bad_tokenizer_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="neither a GGUF file nor a JSON tokenizer"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_seed_tokenizer_formats_are_told_apart_by_content(tmp_path):
    from model.seed_tokenizers import CharFallbackTokenizer
    specials = {name: i for i, name in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>",
                                                  "<system>"])}
    fallback = {"char_to_token": {chr(c): 7 + c for c in range(256)}, "special_tokens": specials}
    (tmp_path / "renamed.dat").write_text(json.dumps(fallback))
    tokenizer = load_tokenizer(tmp_path / "renamed.dat")
    assert isinstance(tokenizer, CharFallbackTokenizer) and tokenizer.encode("A") == [7 + 65]
