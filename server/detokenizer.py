"""Incremental detokenization that never emits a broken character.

Decoding one token at a time is wrong for byte-level BPE (a character's bytes may span tokens) and
for tokenizers whose spacing depends on the neighbours. So each step decodes a short window: the
text of tokens [prefix_offset, read_offset) is what was already emitted, the text of
[prefix_offset, end) minus it is the new text. When the new text ends in U+FFFD the last character
is still incomplete: nothing is emitted and the offsets stay, until a later token completes it.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
PREFIX_WINDOW = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids or [])[-PREFIX_WINDOW:]
        self.token_ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self._first = len(context)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: list[int]) -> str:
        """Append generated tokens; return the newly complete text."""
        self.token_ids.extend(token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT):
            return ""
        if not full_text.startswith(prefix_text):
            # a normaliser changed earlier text; emit only what is beyond it
            new_text = full_text[len(prefix_text):]
        else:
            new_text = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes with U+FFFD)."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text):]
