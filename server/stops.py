"""Stop strings matched on decoded text, across token boundaries.

Text that could still turn out to be the start of a stop string is held back, so a stream never
emits what a later token reveals to be part of a stop string; the stop string itself is never
returned. When several stop strings match, the one that ends first wins (then the earliest start).
"""
from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string completed)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self.held + text
        best = None
        for stop in self.stops:
            index = buffer.find(stop)
            if index >= 0:
                end = index + len(stop)
                if best is None or (end, index) < best:
                    best = (end, index)
        if best is not None:
            self.stopped = True
            self.held = ""
            return buffer[:best[1]], True
        keep = self._longest_partial_suffix(buffer)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def _longest_partial_suffix(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.stopped else held
