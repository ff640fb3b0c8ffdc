"""What the server asks of a tokenizer. Every tokenizer `load_tokenizer` returns follows it:
`TextTokenizer` (a `tokenizers.Tokenizer` from GGUF metadata, a tokenizer.json or SmartLLM's BPE
file) and SmartLLM's character-level `CharFallbackTokenizer`."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None
    stop_token_ids: tuple[int, ...]        # besides EOS, tokens after which generation stops
    special_token_ids: frozenset[int]      # left out of decoded text with skip_special_tokens
    chat_template: str | None              # Jinja source, or None when the tokenizer brings none
    add_bos: bool                          # whether `encode` puts BOS in front

    @property
    def vocab_size(self) -> int:
        """Ids run 0 .. vocab_size - 1 (added tokens included)."""

    def encode(self, text: str) -> list[int]:
        """Text → ids; special tokens written in the text are recognised where the format allows."""

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids → text, special tokens left out unless `skip_special_tokens` is False."""

    def id_to_token(self, token_id: int) -> str | None:
        """The token's own spelling (None for an unknown id)."""

    def token_to_id(self, token: str) -> int | None:
        """The id of a token spelled exactly so (None when there is none)."""
