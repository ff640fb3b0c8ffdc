"""The bytes each token id stands for: the view of a vocabulary a grammar engine needs (a token is
allowed when its bytes continue the grammar), for every tokenizer the server loads.

- `TextTokenizer` over a byte-level BPE (GGUF vocabularies, SmolLM2/GPT-2-style tokenizer.json,
  ShomsherLLM's and SmartLLM's files): each vocabulary token is spelled in GPT-2's byte alphabet
  (`byte_alphabet`), mapped back to its bytes.
- `TextTokenizer` over a SentencePiece-style vocabulary (Metaspace `▁`, `<0xAB>` byte fallback).
- Any other `tokenizers` model: the token's text as UTF-8.
- SmartLLM's character-level file: each character's UTF-8 bytes.
- Any tokenizer with a `token_bytes()` method of its own (test tokenizers).

Special tokens (control tokens, added specials) are listed apart: a grammar never produces them as
text. The view is only usable when decoding a token sequence gives back the concatenation of those
bytes; SmartLLM's BPE file without a decoder does not (its decoded text keeps byte symbols and
joins tokens with spaces), so it is refused with a message naming `--byte-level-decoder`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from model.text.seed_tokenizers import CharFallbackTokenizer
from model.text.tokenizer import TextTokenizer, byte_alphabet

BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
METASPACE = "\u2581"


class NoByteView(ValueError):
    """The tokenizer's tokens cannot be given as bytes that its decoding reproduces."""


@dataclass(frozen=True)
class TokenBytes:
    """`tokens[i]`: the bytes of token i (b"" for ids without any); `special_ids`: ids that are
    control tokens, never text."""

    tokens: tuple[bytes, ...]
    special_ids: frozenset[int]


def token_bytes(tokenizer) -> TokenBytes:
    """The byte view of `tokenizer`'s vocabulary; NoByteView when there is none that decoding honours."""
    own = getattr(tokenizer, "token_bytes", None)
    if callable(own):
        tokens = tuple(own())
        return TokenBytes(tokens, frozenset(getattr(tokenizer, "special_token_ids", ())))
    if isinstance(tokenizer, CharFallbackTokenizer):
        return _char_level(tokenizer)
    if isinstance(tokenizer, TextTokenizer):
        return _text_tokenizer(tokenizer)
    raise NoByteView(f"{type(tokenizer).__name__} gives no byte view of its tokens")


def _char_level(tokenizer: CharFallbackTokenizer) -> TokenBytes:
    tokens = [b""] * tokenizer.vocab_size
    for token_id, char in tokenizer.token_to_char.items():
        if 0 <= token_id < len(tokens):
            tokens[token_id] = char.encode("utf-8")
    return TokenBytes(tuple(tokens), frozenset(tokenizer.special_token_ids))


def _types(node) -> set[str]:
    """Every `type` named in a tokenizers JSON component (Sequence members included)."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for value in node.values():
            found |= _types(value)
    elif isinstance(node, list):
        for value in node:
            found |= _types(value)
    return found


def _text_tokenizer(tokenizer: TextTokenizer) -> TokenBytes:
    spec = json.loads(tokenizer.tokenizer.to_str())
    pre, decoder = _types(spec.get("pre_tokenizer")), _types(spec.get("decoder"))
    byte_level = "ByteLevel" in pre or "ByteLevel" in decoder
    if byte_level and "ByteLevel" not in decoder:
        raise NoByteView("this tokenizer has byte-level tokens but no ByteLevel decoder, so its decoded text is not "
                         "the tokens' bytes (SmartLLM's BPE file: start the server with --byte-level-decoder)")
    added = tokenizer.tokenizer.get_added_tokens_decoder()
    byte_of = {char: byte for byte, char in byte_alphabet().items()}
    byte_fallback = bool(spec.get("model", {}).get("byte_fallback"))
    tokens: list[bytes] = []
    for token_id in range(tokenizer.vocab_size):
        if token_id in added:
            tokens.append(added[token_id].content.encode("utf-8"))
            continue
        text = tokenizer.id_to_token(token_id)
        if text is None:
            tokens.append(b"")
        elif byte_level and all(char in byte_of for char in text):
            tokens.append(bytes(byte_of[char] for char in text))
        elif byte_fallback and (match := BYTE_FALLBACK_TOKEN.fullmatch(text)):
            tokens.append(bytes([int(match.group(1), 16)]))
        else:
            tokens.append(text.replace(METASPACE, " ").encode("utf-8"))
    special = {i for i, token in added.items() if token.special} | set(tokenizer.special_token_ids)
    return TokenBytes(tuple(tokens), frozenset(special))
