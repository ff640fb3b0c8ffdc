"""Stop strings matched on decoded text, across token boundaries.

Text that could still turn out to be the start of a stop string is held back, so a stream never
emits what a later delta reveals to be part of a stop string; the stop string itself is never
returned, nor anything after it.

When several stop strings match, the one that completes first in the stream wins, and of those
completing at the same character the longest (the earliest start). This is the only rule that
does not depend on how the text was cut into deltas: with stops "abc" and "b", "xabc" stops at
"xa" whether it arrives whole or a character at a time. So with "ab" and "abc", "ab" wins.
"""
from __future__ import annotations


class StopStringMatcher:
    """`feed(delta) → (text safe to emit now, stopped)`; `flush() → held-back text` at the end."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return the text that is now safe to emit, and whether a stop string completed (then the
        text is everything before it and every later call returns ("", True))."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._held + text
        match = None                                   # (end, start) of the first stop to complete
        for stop in self.stops:
            start = buffer.find(stop)
            if start >= 0 and (match is None or (start + len(stop), start) < match):
                match = (start + len(stop), start)
        if match is not None:
            self.stopped, self._held = True, ""
            return buffer[:match[1]], True
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep], False

    def _partial_stop_length(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        """The held-back text, when the stream ends without a stop string ("" after a stop)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
