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

`ByteDetokenizer` is the fast form for tokenizers whose decoding is exactly the concatenation of
their tokens' bytes read as UTF-8 (a plain ByteLevel decoder: GPT-2-style BPE, the built-in
model's): a table of each token's bytes and an incremental UTF-8 decoder, so a push costs O(its
own bytes) with no call into the tokenizer. `byte_view(tokenizer)` says whether one applies and
`make_detokenizer` picks the form.
"""
from __future__ import annotations

import codecs
import json

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


class ByteDetokenizer:
    """`push(new output token ids) → newly complete text`; `flush() → what is held back`, for a
    tokenizer whose decoded text is its tokens' bytes as UTF-8 (`byte_view`). Special tokens give no
    text (skip_special_tokens). An incomplete character is held back; invalid bytes become U+FFFD
    exactly as decoding the whole output would make them."""

    __slots__ = ("_bytes", "_texts", "_decoder", "_holding")

    def __init__(self, view: tuple[bytes, ...], texts: tuple[str | None, ...] | None = None):
        """`texts`: `whole_texts(view)`, shared by every request of the tokenizer: a token whose bytes
        are whole characters then gives its text without a call into the UTF-8 decoder."""
        self._bytes = view
        self._texts = texts
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._holding = False           # the decoder may hold the first bytes of a character

    def push(self, token_ids: list[int]) -> str:
        if not self._holding and self._texts is not None and len(token_ids) == 1:
            try:
                text = self._texts[token_ids[0]]
            except IndexError:  # past the tokenizer's vocabulary (a model's padded rows): no text
                return ""
            if text is not None:
                return text
        table = self._bytes
        try:
            data = table[token_ids[0]] if len(token_ids) == 1 else b"".join(table[t] for t in token_ids)
        except IndexError:      # ids past the tokenizer's vocabulary (a model's padded rows) have no text
            data = b"".join(table[t] if t < len(table) else b"" for t in token_ids)
        text = self._decoder.decode(data)
        self._holding = bool(self._decoder.getstate()[0])
        return text

    def flush(self) -> str:
        self._holding = False
        return self._decoder.decode(b"", final=True)


def whole_texts(view: tuple[bytes, ...]) -> tuple[str | None, ...]:
    """Each token's text when its bytes are whole UTF-8 characters (what the incremental decoder
    gives for them when it holds nothing), else None."""
    texts: list[str | None] = []
    for data in view:
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(None)
    return tuple(texts)


def byte_view(tokenizer) -> tuple[bytes, ...] | None:
    """Each token id's bytes (b"" for special tokens) when decoding with skip_special_tokens is
    exactly their concatenation read as UTF-8 (a tokenizers.json whose decoder is ByteLevel alone);
    None otherwise (then the window detokenizer is used)."""
    from model.text.token_bytes import NoByteView, _types, token_bytes
    from model.text.tokenizer import TextTokenizer

    if not isinstance(tokenizer, TextTokenizer):
        return None
    spec = json.loads(tokenizer.tokenizer.to_str())
    if _types(spec.get("decoder")) != {"ByteLevel"} or spec.get("normalizer") is not None:
        return None
    added = tokenizer.tokenizer.get_added_tokens_decoder()
    if any(not token.special for token in added.values()):
        return None       # added text tokens decode as their content: leave those to the tokenizer
    try:
        view = token_bytes(tokenizer)
    except NoByteView:
        return None
    return tuple(b"" if i in view.special_ids else b for i, b in enumerate(view.tokens))


def make_detokenizer(tokenizer, prompt_token_ids: list[int], view: tuple[bytes, ...] | None,
                     texts: tuple[str | None, ...] | None = None):
    """The byte form when `view` (from `byte_view`; `texts`: its `whole_texts`) is given, else the
    window form."""
    if view is not None:
        return ByteDetokenizer(view, texts)
    return IncrementalDetokenizer(tokenizer, prompt_token_ids)
