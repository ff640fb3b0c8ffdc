"""Stop strings on streamed text: split across deltas, overlapping and multiple candidates, a stop at
the very start, held prefixes released, unicode; and against a plain reference on random streams
in random pieces (the result never depends on how the text was cut)."""
from __future__ import annotations

import random

import pytest

from server.engine.stops import StopStringMatcher


def run(stops, pieces) -> tuple[str, bool, list[str]]:
    """Feed every piece (stopping at a stop); returns (all emitted text, stopped, the deltas)."""
    matcher = StopStringMatcher(stops)
    deltas = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        deltas.append(text)
        if stopped:
            assert matcher.feed("more") == ("", True) and matcher.flush() == ""
            return "".join(deltas), True, deltas
    deltas.append(matcher.flush())
    return "".join(deltas), False, deltas


def reference(stops, text) -> tuple[str, bool]:
    """The first position at which some stop string is complete; of those ending there, the longest."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if s and text[:end].endswith(s)]
        if ending:
            return text[:end - max(len(s) for s in ending)], True
    return text, False


def longest_partial(stops, text) -> int:
    return max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])] + [0])


@pytest.mark.parametrize("pieces,stops,expected,stopped", [
    (["Hello wo", "rld! Bye"], ("world",), "Hello ", True),
    (list("Hello world! Bye"), ("world",), "Hello ", True),                      # one character at a time
    (["a", "b", "c", "d"], ("bc",), "a", True),
    (["ab", "x"], ("abc",), "abx", False),                                       # a held prefix is released
    (["ab", "ab", "abc"], ("abc",), "abab", True),
    (["aa", "a", "b"], ("aab",), "a", True),                                     # the partial match slides
    (["STOP", "here"], ("STOP",), "", True),                                     # a stop at the very start
    (["S", "TOP here"], ("STOP",), "", True),
    (["one two", " three"], ("three", "two"), "one ", True),                     # the first to complete wins
    (["xab", "c"], ("ab", "abc"), "x", True),                                    # "ab" completes first
    (["xabc"], ("abc", "b"), "xa", True),                                        # "b" completes first
    (["xabc"], ("abc", "bc"), "x", True),                                        # same end: the longest wins
    (["naïve ", "café", " ok"], ("fé",), "naïve ca", True),
    (["日本", "語の", "テキスト"], ("語のテ",), "日本", True),
    (["emoji 😀", "🎉 party"], ("😀🎉",), "emoji ", True),
    (["no stops at all"], (), "no stops at all", False),
    (["text", ""], ("xyz",), "text", False),
    (["a<|e", "nd", "|>b"], ("<|end|>", "<|eot|>"), "a", True),
])
def test_stop_strings(pieces, stops, expected, stopped):
    out, did_stop, _ = run(stops, pieces)
    assert (out, did_stop) == (expected, stopped)
    assert reference(stops, "".join(pieces)) == (expected, stopped)


def test_nothing_emitted_is_later_part_of_a_stop_string():
    matcher = StopStringMatcher(("<|end|>",))
    emitted = [matcher.feed(ch)[0] for ch in "answer <|en"]
    assert "".join(emitted) == "answer "
    assert emitted[-4:] == ["", "", "", ""]
    assert matcher.feed("d|>") == ("", True)


def test_a_held_prefix_is_released_at_the_end():
    matcher = StopStringMatcher(("</answer>",))
    assert matcher.feed("value </ans") == ("value ", False)
    assert matcher.flush() == "</ans"
    assert matcher.flush() == ""


def test_without_stops_everything_passes_straight_through():
    matcher = StopStringMatcher(())
    assert matcher.feed("abc") == ("abc", False) and matcher.flush() == ""
    assert StopStringMatcher(("", "x")).stops == ("x",)
    assert StopStringMatcher(("x", "x")).stops == ("x",)


@pytest.mark.parametrize("seed", range(6))
def test_random_streams_in_random_pieces_match_the_reference(seed):
    rng = random.Random(seed)
    alphabet = "aab c😀é"
    for _ in range(300):
        stops = tuple("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5)))
                      for _ in range(rng.randrange(1, 4)))
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 25)))
        pieces, i = [], 0
        while i < len(text):
            n = rng.choice([1, 1, 2, 3, 7])
            pieces.append(text[i:i + n])
            i += n
        out, stopped, deltas = run(stops, pieces)
        assert (out, stopped) == reference(stops, text), (stops, text, pieces)
        # nothing is held longer than needed: after each piece the emitted text is all that was
        # seen except the longest tail that could still start a stop string
        seen, emitted = "", ""
        for piece, delta in zip(pieces, deltas):
            seen += piece
            emitted += delta
            if reference(stops, seen)[1]:
                break
            assert emitted == seen[:len(seen) - longest_partial(stops, seen)], (stops, seen)
