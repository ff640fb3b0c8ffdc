"""Incremental detokenization that never emits a broken character.

Decoding one token at a time is wrong for byte-level BPE (a character's bytes may span tokens) and
for tokenizers whose spacing depends on the neighbours (SentencePiece drops the leading space of
the first token it decodes). So each push decodes a short window of tokens, the offsets trick of
vLLM and Hugging Face's TextStreamer: tokens [prefix_offset, read_offset) were emitted already and
give the context; the text of [prefix_offset, end) minus the text of [prefix_offset, read_offset)
is the new text. When the window's text ends in U+FFFD a character is still incomplete: nothing
is emitted and the offsets stay, until a later token completes it (or `flush` gives up at the end).

The window starts with the last few prompt tokens, so the first generated token is decoded in
context (a SentencePiece leading space is kept, as it is after the prompt). If the prompt itself
ends inside a character, the context is dropped and the output decodes on its own.

For byte-level BPE the concatenation of all deltas equals `tokenizer.decode(output_ids)`. A decoder
that rewrites earlier text when more follows (a clean-up of spaces before punctuation) can make the
window's text not start with its prefix's; the new text is then cut by length.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """`push(new output token ids) → newly complete text`; `flush() → what is held back`.

    `tokenizer`: any object with `decode(ids: list[int], skip_special_tokens: bool) -> str`."""

    def __init__(self, tokenizer, prompt_token_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids or [])[-CONTEXT_TOKENS:]
        if context and self._decode(context).endswith(REPLACEMENT):
            context = []
        self._tokens: list[int] = context          # context, then every output token
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)

    @property
    def output_token_ids(self) -> list[int]:
        return self._tokens[self._num_context:]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, hold_incomplete: bool) -> str:
        prefix_text = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        window_text = self._decode(self._tokens[self._prefix_offset:])
        if len(window_text) <= len(prefix_text) or (hold_incomplete and window_text.endswith(REPLACEMENT)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return window_text[len(prefix_text):]

    def push(self, token_ids: list[int]) -> str:
        """Append generated tokens; return the text they complete (maybe "")."""
        if not token_ids:
            return ""
        self._tokens.extend(token_ids)
        return self._advance(hold_incomplete=True)

    def flush(self) -> str:
        """At the end: whatever is held back (an incomplete character then shows as U+FFFD)."""
        if self._read_offset == len(self._tokens):
            return ""
        return self._advance(hold_incomplete=False)
