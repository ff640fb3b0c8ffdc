"""Incremental detokenization with small real tokenizers trained here: byte-level BPE whose tokens
split (and straddle) multi-byte characters, and a SentencePiece-style tokenizer (▁ for spaces, the
first leading space stripped, byte fallback). No delta may contain U+FFFD for valid text, and the
deltas must add up to the full decode, however the tokens arrive."""
from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from server.engine.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"

TEXTS = [
    "Emoji: 😀🎉👍🏽 and 👨‍👩‍👧!", "中文字符测试，日本語のテキスト。", "Ünïcödé ñ ß ø é", "mixed: a😀b中c\n\tdone",
    "Здравствуйте, мир", "¯\\_(ツ)_/¯ ∑∫√∞", "plain ascii text, nothing special.", "🏳️‍🌈 flags 🇫🇷🇯🇵 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
CORPUS = TEXTS[:6] + ["hello world, the quick brown fox", "café naïve résumé 中文 😀 🎉", "中文字符 日本語 テキスト"]
CHARS = list("abc xyz,.!\n") + list("éñßøü") + list("中文字符日本語") + ["😀", "🎉", "👍🏽", "👨‍👩‍👧", "𝔘", "∑"]


def byte_level_bpe(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|end|>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 2, trainer)
    return tokenizer


def sentencepiece_style() -> Tokenizer:
    """Llama-style: Metaspace pre-tokenizer, byte fallback for characters outside the vocabulary, and
    a decoder that turns ▁ into spaces and strips the first one."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog.",
                                   "Hello there! How are you today?", "prompt: answer the question"] * 5, trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    first = len(vocab)
    vocab.update({f"<0x{b:02X}>": first + b for b in range(256)})
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return Tokenizer.from_str(json.dumps(spec))


TOKENIZERS = {"bpe300": byte_level_bpe(300), "bpe420": byte_level_bpe(420), "spm": sentencepiece_style()}


@pytest.fixture(params=sorted(TOKENIZERS))
def tokenizer(request) -> Tokenizer:
    return TOKENIZERS[request.param]


def stream(tokenizer, ids, prompt=None, chunks=None, skip_special_tokens=True) -> list[str]:
    """Push `ids` in pieces of the given sizes (one at a time by default); the last delta is flush()."""
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas, i = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(detok.push(ids[i:i + size]))
        i += size
    assert i == len(ids)
    return deltas + [detok.flush()]


def test_the_tokenizers_really_split_characters():
    for name in ("bpe300", "bpe420", "spm"):
        tok = TOKENIZERS[name]
        pieces = [tok.decode([i]) for text in TEXTS for i in tok.encode(text).ids]
        assert any(REPLACEMENT in p for p in pieces), name
    # a byte-level token that completes one character and starts the next
    tok = TOKENIZERS["bpe420"]
    assert any(not p.startswith(REPLACEMENT) and p.endswith(REPLACEMENT) and len(p) > 1
               for text in TEXTS for p in (tok.decode([i]) for i in tok.encode(text).ids))


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_never_emits_a_broken_character(tokenizer, text):
    ids = tokenizer.encode(text).ids
    deltas = stream(tokenizer, ids)
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    if any(REPLACEMENT in tokenizer.decode([i]) for i in ids):
        assert "" in deltas[:-1], "something was held back while a character was incomplete"
    assert deltas[-1] == ""


def test_text_is_emitted_as_soon_as_its_character_completes():
    tok = TOKENIZERS["bpe300"]
    ids = tok.encode("a😀b").ids
    detok = IncrementalDetokenizer(tok)
    seen = ""
    for n, token in enumerate(ids, 1):
        seen += detok.push([token])
        assert seen == tok.decode(ids[:n]).rstrip(REPLACEMENT)
    assert seen == "a😀b"


def test_random_text_in_random_chunks_adds_up_to_the_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(150):
        text = "".join(rng.choice(CHARS) for _ in range(rng.randrange(1, 30)))
        ids = tokenizer.encode(text).ids
        chunks, left = [], len(ids)
        while left:
            chunks.append(min(left, rng.choice([1, 1, 2, 3, 5])))
            left -= chunks[-1]
        prompt = tokenizer.encode(rng.choice(["", "Prompt: ", "中文 ", "x😀"])).ids or None
        deltas = stream(tokenizer, ids, prompt, chunks)
        assert all(REPLACEMENT not in d for d in deltas), (text, deltas)
        joined = "".join(deltas)
        if tokenizer is not TOKENIZERS["spm"]:
            assert joined == tokenizer.decode(ids) == text, (text, deltas)
        elif prompt:
            # after a prompt the first token's leading space is kept, as it is in the prompt's decode
            full = tokenizer.decode(prompt + ids)
            assert joined == full[len(tokenizer.decode(prompt)):], (text, deltas)
        else:
            assert joined == tokenizer.decode(ids) == (text[1:] if text.startswith(" ") else text), (text, deltas)


def test_sentencepiece_spaces_come_out_right():
    tok = TOKENIZERS["spm"]
    ids = tok.encode("Hello world, the quick brown fox").ids
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids), "naive per-token decoding loses spaces"
    assert "".join(stream(tok, ids)) == "Hello world, the quick brown fox"
    prompt = tok.encode("prompt:").ids
    assert "".join(stream(tok, ids, prompt)) == " Hello world, the quick brown fox"


@pytest.mark.parametrize("text", TEXTS[:2] + TEXTS[3:4] + TEXTS[7:])
def test_an_incomplete_character_at_the_end_is_held_until_flush(tokenizer, text):
    ids = tokenizer.encode(text).ids
    cut = next((n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith(REPLACEMENT)), None)
    if cut is None:
        pytest.skip("no token boundary inside a character")
    ids = ids[:cut]
    detok = IncrementalDetokenizer(tokenizer)
    pushed = "".join(detok.push([i]) for i in ids)
    tail = detok.flush()
    assert REPLACEMENT not in pushed and text.startswith(pushed)
    assert tail.endswith(REPLACEMENT) and text.startswith(pushed + tail.rstrip(REPLACEMENT))
    if tokenizer is not TOKENIZERS["spm"]:
        # byte-level decoding is local; byte fallback turns a whole invalid run of bytes into U+FFFD
        assert pushed + tail == tokenizer.decode(ids)
    assert detok.flush() == ""


def test_genuinely_invalid_bytes_in_the_middle_come_out_as_they_decode():
    tok = TOKENIZERS["spm"]
    stray = tok.token_to_id("<0x9F>")                # a continuation byte with no lead byte
    ids = tok.encode("ab").ids + [stray] + tok.encode("cd").ids
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert REPLACEMENT in tok.decode(ids) and not deltas[-1], "released once valid text follows"


def test_special_tokens_are_skipped_or_kept():
    tok = TOKENIZERS["bpe300"]
    end = tok.token_to_id("<|end|>")
    ids = tok.encode("hi 中").ids + [end] + tok.encode("文").ids
    assert "".join(stream(tok, ids)) == "hi 中文"
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == "hi 中<|end|>文"
    assert stream(tok, [end, end]) == ["", "", ""]


def test_a_prompt_ending_inside_a_character_is_not_used_as_context():
    tok = TOKENIZERS["bpe300"]
    emoji = tok.encode("x😀").ids
    prompt, output = emoji[:-1], emoji[-1:] + tok.encode(" done").ids
    assert REPLACEMENT in tok.decode(prompt)
    assert "".join(stream(tok, output, prompt)) == tok.decode(output)


def test_prompt_context_does_not_change_byte_level_output(tokenizer):
    if tokenizer is TOKENIZERS["spm"]:
        pytest.skip("SentencePiece keeps the first leading space after a prompt (tested above)")
    ids = tokenizer.encode(" after the prompt 中文😀").ids
    for prompt in (tokenizer.encode("Prompt: ").ids, tokenizer.encode("中文字符测试，日本語").ids, [], None):
        assert "".join(stream(tokenizer, ids, prompt)) == tokenizer.decode(ids)


def test_empty_pushes_and_output_token_ids():
    tok = TOKENIZERS["bpe300"]
    detok = IncrementalDetokenizer(tok, tok.encode("prompt").ids)
    assert detok.push([]) == "" and detok.flush() == ""
    ids = tok.encode("a😀").ids
    text = detok.push(ids) + detok.flush()
    assert text == "a😀" and detok.output_token_ids == ids


def test_works_with_the_servers_tokenizer_interface():
    class Wrapper:                       # decode(ids, skip_special_tokens=...) is all it needs
        def __init__(self, inner):
            self.inner = inner

        def decode(self, ids, skip_special_tokens=True):
            return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    tok = TOKENIZERS["bpe420"]
    ids = tok.encode(TEXTS[0]).ids
    assert "".join(stream(Wrapper(tok), ids)) == TEXTS[0]


def test_ids_past_the_tokenizers_vocabulary_have_no_text():
    # a model may have more rows than its tokenizer has tokens (padded vocabularies): sampling one of
    # them must not break the stream
    from server.engine.detokenizer import ByteDetokenizer
    detokenizer = ByteDetokenizer((b"a", b"\xc3", b"\xa9"))
    assert detokenizer.push([0]) == "a"
    assert detokenizer.push([7]) == ""
    assert detokenizer.push([1, 9, 2]) == "é"
    assert detokenizer.flush() == ""
