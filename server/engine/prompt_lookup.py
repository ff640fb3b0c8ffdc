"""Prompt lookup: draft tokens for speculative decoding taken from the request's own context.

Summaries quote their source, edited code repeats most of the code it was given, structured
answers repeat their keys: the next tokens often already appear in the prompt or the output so far.
The lookup takes the last n tokens (n from `max_n` down to `min_n`), finds the most recent earlier
place where those n tokens occur, and proposes the (up to) k tokens that followed them there.

Each request keeps its tokens in a growing int64 buffer (`TokenHistory`), caught up with the
tokens appended since the last lookup, so a lookup costs a few vectorised passes over the buffer
(one comparison of every position with the last token, then one per further n-gram token over
the candidates left) and no Python loop over the context.
"""
from __future__ import annotations

import numpy as np


class TokenHistory:
    """A request's tokens, prompt then output, in a numpy buffer that grows by doubling."""

    __slots__ = ("tokens", "length")

    def __init__(self, capacity: int = 256):
        self.tokens = np.empty(capacity, dtype=np.int64)
        self.length = 0

    def catch_up(self, prompt: list[int], output: list[int]) -> np.ndarray:
        """The buffer brought up to `prompt + output` (tokens are only ever appended) → a view [L]."""
        total = len(prompt) + len(output)
        if total > len(self.tokens):
            grown = np.empty(max(total, 2 * len(self.tokens)), dtype=np.int64)
            grown[:self.length] = self.tokens[:self.length]
            self.tokens = grown
        if self.length < len(prompt):
            self.tokens[self.length:len(prompt)] = prompt[self.length:]
            self.length = len(prompt)
        if self.length < total:
            done = self.length - len(prompt)
            self.tokens[self.length:total] = output[done:]
            self.length = total
        return self.tokens[:total]


def propose(tokens: np.ndarray, num_drafts: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """tokens [L] int64 → up to `num_drafts` tokens: those that followed the most recent earlier
    occurrence of the longest suffix n-gram (`max_n` ≥ n ≥ `min_n`) that occurred before; [] when
    none did. An occurrence may overlap the suffix itself (a repeating pattern continues)."""
    length = len(tokens)
    if num_drafts <= 0 or length < min_n + 1:
        return []
    # ends[i]: positions p < L-1 where an occurrence of the suffix may end; kept sorted, so the last
    # one left is the most recent
    ends = np.flatnonzero(tokens[:length - 1] == tokens[length - 1])                        # [C]
    best_end = int(ends[-1]) if len(ends) and min_n <= 1 else -1
    for offset in range(1, min(max_n, length - 1)):
        ends = ends[ends >= offset]
        ends = ends[tokens[ends - offset] == tokens[length - 1 - offset]]
        if not len(ends):
            break
        if offset + 1 >= min_n:
            best_end = int(ends[-1])
    if best_end < 0:
        return []
    return tokens[best_end + 1:best_end + 1 + num_drafts].tolist()
