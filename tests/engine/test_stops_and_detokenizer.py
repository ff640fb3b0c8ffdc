"""Stop strings across token boundaries and incremental detokenization of characters split across
tokens, with the built-in model's byte-level BPE tokenizer."""
from __future__ import annotations

import pytest

from model.loading.builtin import builtin_model_path
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.stops import StopStringMatcher
from tests.default_model import tokenizer_of_gguf


def feed_all(matcher, pieces):
    out, stopped = "", False
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out += text
        if stopped:
            return out, True
    return out + matcher.flush(), False


@pytest.mark.parametrize("pieces,stops,expected,stopped", [
    (["Hello wo", "rld! Bye"], ("world",), "Hello ", True),
    (["a", "b", "c", "d"], ("bc",), "a", True),
    (["ab", "x"], ("abc",), "abx", False),              # a held prefix that did not match is released
    (["STOP", "here"], ("STOP",), "", True),            # stop at the very start
    (["one two", " three"], ("three", "two"), "one ", True),   # the stop that ends first wins
    (["xab", "c"], ("ab", "abc"), "x", True),
    (["naïve ", "café", " ok"], ("fé",), "naïve ca", True),
    (["no stops at all"], (), "no stops at all", False),
])
def test_stop_strings(pieces, stops, expected, stopped):
    assert feed_all(StopStringMatcher(stops), pieces) == (expected, stopped)


def test_nothing_emitted_is_later_part_of_a_stop_string():
    matcher = StopStringMatcher(("<|end|>",))
    emitted = []
    for ch in "answer<|en":
        emitted.append(matcher.feed(ch)[0])
    assert "".join(emitted) == "answer"
    assert matcher.feed("d|>")[1] is True


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_of_gguf(builtin_model_path())


@pytest.mark.parametrize("text", ["Emoji: 😀🎉👍🏽 and 👨‍👩‍👧!", "中文字符测试，日本語のテキスト。", "Ünïcödé ñ ß ø é",
                                  "mixed: a😀b中c\n\tdone", "Здравствуйте, мир", "¯\\_(ツ)_/¯ ∑∫√∞"])
def test_incremental_detokenizer_never_emits_broken_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    split = any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=tokenizer.encode("Prompt: "))
    deltas = [detok.push([i]) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    if split:
        assert "" in deltas[:-1]   # something was held back while a character was incomplete
