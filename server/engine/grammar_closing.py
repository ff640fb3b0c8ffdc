"""The closing path of a grammar state: a short way to complete the document from where it stands,
found greedily on a copy of the matcher. The wrap-up of `server/engine/grammar.py` follows it when a
request's token budget runs short, so that its document ends complete instead of cut."""
from __future__ import annotations

import re

import llguidance as llg
import numpy as np

# a rollout longer than this, or than the budget left, is given up (the distance is then unknown and
# nothing is narrowed: the answer cannot be completed in time, or the grammar is too long to tell)
ROLLOUT_LIMIT = 256
# the rollout takes tokens of the same preferred kind at most this many times in a row, then tries the
# other kinds until it makes progress (a pattern or format may accept `}` or `0` forever, e.g. an
# e-mail's local part)
ROLLOUT_REPEATS = 4
# what the rollout tries, in this order, when the grammar forces nothing: tokens that close a string
# (and possibly the arrays and objects around it); inside a string that cannot end yet (a pattern or
# format), `@` and `a`; tokens that close arrays and objects; then single characters that move a
# document on (the next item or property, a number, a nested object or array). Failing all, the
# grammar's allowed token of lowest id.
QUOTE_CLOSER = re.compile(rb'""?[\]}]*')
BRACKET_CLOSER = re.compile(rb'[\]}]+')
TEXT_STEPPERS = (b"@", b"a")
STEPPERS = (b",", b"1", b"0", b".", b"{", b"[")


def rollout_candidates(tokens: list[bytes], special_ids) -> list[tuple[int, int]]:
    """The (kind, token id) pairs `closing_path` tries, in order: tokens that close a string (kind
    0), the `TEXT_STEPPERS`, tokens that close arrays and objects, then the `STEPPERS` (each of
    those its own kind; single tokens the vocabulary has)."""
    special = frozenset(special_ids)
    normal = [(t, data) for t, data in enumerate(tokens) if data and t not in special]
    # an empty string first (`""`: a string value in one token, never valid inside a string), then
    # the closing quote with the brackets after it, longest first
    quotes = sorted((t for t, data in normal if QUOTE_CLOSER.fullmatch(data)),
                    key=lambda t: (not tokens[t].startswith(b'""'), -len(tokens[t]), t))
    brackets = sorted((t for t, data in normal if BRACKET_CLOSER.fullmatch(data)), key=lambda t: (-len(tokens[t]), t))
    by_bytes = {}
    for t, data in normal:
        by_bytes.setdefault(data, t)
    text = [by_bytes[b] for b in TEXT_STEPPERS if b in by_bytes]
    steppers = [by_bytes[b] for b in STEPPERS if b in by_bytes]
    return ([(0, t) for t in quotes] + [(1 + i, t) for i, t in enumerate(text)]
            + [(1 + len(text), t) for t in brackets] + [(2 + len(text) + i, t) for i, t in enumerate(steppers)])


def closing_path(matcher: llg.LLMatcher, candidates: list[tuple[int, int]],
                 limit: int = ROLLOUT_LIMIT) -> list[int] | None:
    """The tokens of a short way to complete the grammar from `matcher`'s state ([] when it is
    complete already, None when none was found within `limit` tokens), found greedily on a copy
    (`matcher` is not changed): the tokens the grammar forces, else the first of `candidates` it
    allows (a kind taken `ROLLOUT_REPEATS` times in a row is skipped until a forced token or a
    closed string), else its allowed token of
    lowest id. Every token of the path is one the grammar allowed at that point."""
    probe = matcher.deep_copy()
    path: list[int] = []
    kind, repeats = None, 0
    stalled: set[int] = set()       # kinds taken ROLLOUT_REPEATS times in a row since the last progress
    while len(path) <= limit:
        if probe.is_error():
            return None
        if probe.is_stopped() or probe.is_accepting():
            return path if len(path) <= limit else None
        forced = probe.compute_ff_tokens()
        taken = probe.try_consume_tokens(forced) if forced else 0
        if taken:
            path += forced[:taken]
            kind, repeats = None, 0
            stalled.clear()
            continue
        for candidate_kind, token in candidates:
            if candidate_kind in stalled:
                continue
            if probe.try_consume_tokens([token]) == 1:
                break
        else:
            candidate_kind = -1
            token = _lowest_allowed(probe)
            if token is None or not probe.consume_token(token):
                return None
        repeats = repeats + 1 if candidate_kind == kind else 1
        kind = candidate_kind
        if candidate_kind == 0:     # a string closed: progress
            stalled.clear()
        elif repeats >= ROLLOUT_REPEATS and candidate_kind >= 0:
            stalled.add(candidate_kind)
        path.append(token)
    return None


def _lowest_allowed(matcher: llg.LLMatcher) -> int | None:
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    allowed = np.flatnonzero(bits)
    return int(allowed[0]) if len(allowed) else None


def allowed(mask: np.ndarray, token: int) -> bool:
    """Whether llguidance's packed bitmask (one bit per token id) allows `token`."""
    return bool((int(mask.view(np.uint32)[token >> 5]) >> (token & 31)) & 1)
