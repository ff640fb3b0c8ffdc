"""Tokenizers: a `tokenizers.Tokenizer` built from GGUF metadata (byte-level BPE) or read from a
tokenizer.json, behind one small interface the server uses."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

GGUF_CONTROL_TOKEN = 3
GGUF_USER_DEFINED_TOKEN = 4


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_level_pre_tokenizer(kind: str | None):
    """The pre-tokenizer a GGUF `tokenizer.ggml.pre` names. `smollm` (SmolLM/cosmo2) splits every
    digit on its own before GPT-2's byte-level split, as its tokenizer.json and llama.cpp do."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if kind in (None, "default", "gpt-2", "gpt2"):
        return byte_level
    raise ValueError(f"GGUF pre-tokenizer {kind!r} is not supported (supported: smollm, gpt2)")


class TextTokenizer:
    """encode/decode plus the special ids the engine needs."""

    def __init__(self, tokenizer: Tokenizer, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool = False, chat_template: str | None = None, extra_stop_ids: tuple[int, ...] = ()):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.stop_token_ids = tuple(t for t in extra_stop_ids if t is not None)
        self.special_token_ids = frozenset(
            i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL (encode does not), so a long prompt does not stall the server
        ids = self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    # ---- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_gguf_reader(cls, reader) -> "TextTokenizer":
        def field(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
        tokens = field("tokenizer.ggml.tokens")
        types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
        alphabet = set(_byte_alphabet().values())
        vocab = {}
        for index, token in enumerate(tokens):
            if not set(token) <= alphabet:  # a token stored as plain text: spell it in the byte alphabet
                token = "".join(_byte_alphabet()[b] for b in token.encode("utf-8"))
            vocab.setdefault(token, index)
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tokenizer.pre_tokenizer = byte_level_pre_tokenizer(field("tokenizer.ggml.pre"))
        tokenizer.decoder = decoders.ByteLevel()
        specials = [AddedToken(tokens[i], special=True, normalized=False)
                    for i, t in enumerate(types) if t == GGUF_CONTROL_TOKEN]
        user_defined = [AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == GGUF_USER_DEFINED_TOKEN]
        tokenizer.add_special_tokens(specials)
        if user_defined:
            tokenizer.add_tokens(user_defined)
        return cls(tokenizer, field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
                   chat_template=field("tokenizer.chat_template"))

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        """A tokenizer.json; special ids and the chat template from tokenizer_config.json beside it."""
        path = Path(path)
        tokenizer = Tokenizer.from_file(str(path))
        config_path = path.parent / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}

        def special_id(name: str) -> int | None:
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            return tokenizer.token_to_id(value) if isinstance(value, str) else None

        eos = special_id("eos_token")
        if eos is None:
            eos = tokenizer.token_to_id("<|endoftext|>")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tokenizer, special_id("bos_token"), eos, add_bos=bool(config.get("add_bos_token", False)),
                   chat_template=template)


SEED_TOKENIZER_FILES = ("tokenizer.json", "smart-bpe-tokenizer.json", "fallback-tokenizer.json",
                        "tokenizer/bpe_tokenizer.json", "bpe_tokenizer.json")


def load_tokenizer(path: str | Path):
    """A .gguf file, a tokenizer.json, SmartLLM's BPE or character-level file (told apart by their
    content, not their names), or a directory holding one of those."""
    from model.seed_tokenizers import detect_tokenizer_kind, load_seed_tokenizer

    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in SEED_TOKENIZER_FILES if (path / name).is_file()), None)
        if found is None:
            raise ValueError(f"{path}: no tokenizer.json in this directory")
        path = found
    if not path.exists():
        raise ValueError(f"tokenizer {path} does not exist")
    kind = detect_tokenizer_kind(path)
    if kind == "gguf":
        from gguf import GGUFReader
        return TextTokenizer.from_gguf_reader(GGUFReader(str(path)))
    if kind in ("smart_llm_bpe", "smart_llm_char"):
        return load_seed_tokenizer(path)
    try:
        tokenizer = TextTokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises its own exception types
        raise ValueError(f"{path} is not a tokenizer.json the tokenizers library can read: {exc}") from None
    if tokenizer.eos_token_id is None:          # ShomsherLLM's file names its only special `<eos>`
        tokenizer.eos_token_id = tokenizer.token_to_id("<eos>")
    return tokenizer
