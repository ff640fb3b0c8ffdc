"""The GGUF-built tokenizer of the built-in model against two independent tokenizers of the same file:
Hugging Face's (transformers' GGUF converter) and llama.cpp's (where llama-cpp-python is installed).

transformers' converter ignores the GGUF's `smollm` pre-tokenizer (it uses GPT-2's split alone), so
it differs from the model's real tokenizer exactly where a whitespace run ends right before a numeric
character; on those strings ours must equal Hugging Face's vocabulary and merges under SmolLM2's own
pre-tokenizer (built here from `tokenizers`' Digits + ByteLevel components, as SmolLM2's
tokenizer.json has it) and llama.cpp."""
from __future__ import annotations

import json
import random
import unicodedata

import pytest

from model.text.protocol import Tokenizer as TokenizerProtocol
from model.text.tokenizer import TextTokenizer, load_tokenizer
from tests.default_model import default_gguf_path

BASE = [
    # English and punctuation
    "Hello world", "Hello, World!", "The quick brown fox jumps over the lazy dog.", "Mr. Smith's dog; Mrs. Jones' cat?",
    "don't won't it's I'M you'RE they've we'll she'd", "ALL CAPS SHOUTING", "MiXeD cAsE", "...---...", "~!@#$%^&*()_+",
    "«quotes» “curly” ‘single’ — dash – en", "a.b,c;d:e!f?g", "(parenthetical [bracketed {braced}])",
    # whitespace: runs of spaces, newlines, tabs, CRLF, unusual spaces
    "  leading spaces", "trailing spaces   ", "\n\nnewlines\n\n\n", "\ttabs\tand\tmore", "       ", "a  b   c    d",
    "line1\r\nline2\r\n", "\n \n  \n", "mixed \t \n whitespace", "\u00a0non-breaking\u00a0space", "zero\u200bwidth",
    "ideographic\u3000space", " ", "\n", "\t", "x\n\n\n\n\n\ny",
    # digits and numbers
    "12345", "3.14159265358979323846", "1,000,000 dollars", "2026-11-24T10:00:00Z", "0x1F 0b1010 1e-9",
    "version 2.13.0", "call 555-0199 now", "9999999999999999999999", "a  1", "x   42", "\n\n7", "\t3", "page 2 of 10",
    "１２３ full-width", "½ ² ٣ Ⅻ ⅷ numbers", " ½", "¼cup", "42nd street",
    # code
    "def f(x):\n    return x ** 2  # square", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<html><body class=\"x\">hi</body></html>", "SELECT * FROM t WHERE id = 7;", "    indented code",
    "if x:\n\tpass\nelse:\n\t\treturn None", "const f = (a, b) => a ?? b;", "#include <stdio.h>\nint main(){}",
    "https://example.com/path?q=1&r=2#frag", "user@example.com", "snake_case_name camelCaseName", "$HOME/.config",
    "```python\nprint('hi')\n```", "x = [1, 2, 3]\ny = {'a': 1}",
    # special tokens inside text
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "a<|im_end|>b",
    "text <|im_start|> more <|im_end|>", "<|im_start|><|im_start|>", "<|im_start", "<repo_name>x<file_sep>y",
    # emoji, CJK, scripts, accents
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "🇫🇷🇯🇵", "❤️🔥", "中文字符测试", "日本語のテキスト", "한국어 문장", "混合 mixed テキスト",
    "café naïve façade", "Ünïcödé ñ ß ø", "Здравствуйте, мир", "مرحبا بالعالم", "नमस्ते दुनिया", "ελληνικά γράμματα",
    "math: ∑∫√∞≠≤", "¯\\_(ツ)_/¯", "e\u0301 combining", "Å vs A\u030a", "\U0001d400\U0001d401 bold math",
]
PIECES = BASE + ["word", " ", "  ", "\n", "\t", "42", "7", "🎉", "é", "中", "(", ")", "The", "ing", "0", "<|im_end|>",
                 "½", "\u00a0", "'s", "'S"]


def corpus() -> list[str]:
    rng = random.Random(7)
    texts = dict.fromkeys(BASE)
    while len(texts) < 460:
        texts["".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 12)))] = None
    return list(texts)


def whitespace_before_numeric(text: str) -> bool:
    return any(a.isspace() and unicodedata.category(b).startswith("N") for a, b in zip(text, text[1:]))


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(default_gguf_path())


@pytest.fixture(scope="module")
def theirs(hf_tokenizer):
    return hf_tokenizer


def test_corpus_is_varied():
    texts = corpus()
    assert len(texts) >= 200 and len(set(texts)) >= 200
    assert sum(whitespace_before_numeric(t) for t in texts) >= 20


def test_ids_equal_hugging_face_vocabulary_under_smollm2_pre_tokenizer(ours, theirs):
    """Hugging Face's vocabulary and merges from the same GGUF, split as SmolLM2's tokenizer.json
    splits (every numeric character alone, then GPT-2's byte-level rule): all strings equal."""
    from tokenizers import Tokenizer, pre_tokenizers
    reference = Tokenizer.from_str(theirs.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    mismatches = [t for t in corpus() if ours.encode(t) != reference.encode(t, add_special_tokens=False).ids]
    assert not mismatches, f"{len(mismatches)} differ, e.g. {mismatches[:3]!r}"


def test_ids_equal_hugging_face_gguf_tokenizer(ours, theirs):
    """Plain `AutoTokenizer.from_pretrained(dir, gguf_file=…)`: equal on every string without a
    whitespace run ending at a numeric character, and on those only the split differs (same text)."""
    texts = corpus()
    same = [t for t in texts if not whitespace_before_numeric(t)]
    assert len(same) >= 200
    mismatches = [t for t in same if ours.encode(t) != theirs.encode(t, add_special_tokens=False)]
    assert not mismatches, f"{len(mismatches)} differ, e.g. {mismatches[:3]!r}"
    assert ours.encode("a  1") == [81, 256, 33]                                 # a | ĠĠ | 1
    assert theirs.encode("a  1", add_special_tokens=False) == [81, 216, 216, 33]  # a | Ġ | Ġ | 1
    for text in texts:
        ids = ours.encode(text)
        assert theirs.decode(ids, skip_special_tokens=False) == ours.decode(ids, skip_special_tokens=False) == text


def test_ids_equal_llama_cpp(ours):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(default_gguf_path()), vocab_only=True, verbose=False)
    mismatches = [t for t in corpus() if llm.tokenize(t.encode(), add_bos=False, special=True) != ours.encode(t)]
    assert not mismatches, f"{len(mismatches)} differ, e.g. {mismatches[:3]!r}"


def test_decode_round_trips(ours, theirs):
    for text in corpus():
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_special_ids_and_no_bos(ours):
    assert isinstance(ours, TokenizerProtocol)
    assert (ours.bos_token_id, ours.eos_token_id, ours.vocab_size) == (1, 2, 49152)
    assert ours.stop_token_ids == (0,)                            # <|endoftext|> also ends generation
    assert ours.special_token_ids == frozenset(range(17))
    assert ours.id_to_token(1) == "<|im_start|>" and ours.token_to_id("<|im_end|>") == 2
    assert ours.encode("<|im_start|>")[0] == 1 and ours.encode("hi")[0] != 1
    assert ours.decode([1, 19556, 2]) == "Hello"
    assert ours.decode([1, 19556, 2], skip_special_tokens=False) == "<|im_start|>Hello<|im_end|>"
    assert ours.chat_template is not None and "<|im_start|>" in ours.chat_template


def test_from_gguf_metadata_accepts_plain_fields(ours):
    from gguf import GGUFReader
    reader = GGUFReader(str(default_gguf_path()))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    again = TextTokenizer.from_gguf_metadata(fields)
    assert again.encode("Hello  42 <|im_end|>") == ours.encode("Hello  42 <|im_end|>")
    with pytest.raises(ValueError, match="tokenizer model 'llama' is not supported"):
        TextTokenizer.from_gguf_metadata({**fields, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="pre-tokenizer 'qwen2' is not supported"):
        TextTokenizer.from_gguf_metadata({**fields, "tokenizer.ggml.pre": "qwen2"})


def test_tokenizer_json_loads_the_same(ours, tmp_path):
    (tmp_path / "tokenizer.json").write_text(ours.tokenizer.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "x"}))
    for source in (tmp_path, tmp_path / "tokenizer.json"):
        again = load_tokenizer(source)
        assert isinstance(again, TextTokenizer) and again.eos_token_id == 2 and again.chat_template == "x"
        assert again.stop_token_ids == (0,)
        for text in corpus()[:80]:
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
    from model.text.seed_tokenizers import CharFallbackTokenizer
    specials = {name: i for i, name in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>",
                                                  "<system>"])}
    fallback = {"char_to_token": {chr(c): 7 + c for c in range(256)}, "special_tokens": specials}
    (tmp_path / "renamed.dat").write_text(json.dumps(fallback))
    tokenizer = load_tokenizer(tmp_path / "renamed.dat")
    assert isinstance(tokenizer, CharFallbackTokenizer) and tokenizer.encode("A") == [7 + 65]
