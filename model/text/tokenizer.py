"""Tokenizers: a byte-level BPE `tokenizers.Tokenizer` built from GGUF metadata, or any tokenizer.json,
behind the small interface the server uses (`TextTokenizer`, a `model.text.protocol.Tokenizer`);
`load_tokenizer` tells the files apart and builds the right one.

Pre-tokenisation of a GGUF vocabulary follows `tokenizer.ggml.pre`, the name llama.cpp gives the
split the merges were learned with. `smollm` (SmolLM/SmolLM2, cosmo2 tokenizer) first isolates every
numeric character, then applies GPT-2's split; this is what SmolLM2's own tokenizer.json does
(`Digits(individual_digits=True)` then `ByteLevel`) and what llama.cpp does for `smollm`. Note that
transformers' GGUF converter (5.x) ignores `smollm` and uses GPT-2's split alone, so it differs from
the model's tokenizer where whitespace runs end in a digit ("a  1": ours "a", "ĠĠ", "1"; theirs
"a", "Ġ", "Ġ", "1").
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from model.text.protocol import Tokenizer as TokenizerProtocol

GGUF_NORMAL_TOKEN, GGUF_CONTROL_TOKEN, GGUF_USER_DEFINED_TOKEN = 1, 3, 4

# GPT-2's split (the one `tokenizers`' ByteLevel applies with use_regex=True): contractions, optional
# space + letters, optional space + numbers, optional space + other symbols, whitespace not followed
# by a non-space (so a run of spaces leaves its last space to the next word), any other whitespace.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# every numeric character on its own (Unicode N*, like `Digits(individual_digits=True)`)
DIGIT_SPLIT = r"\p{N}"
PRE_TOKENIZER_SPLITS = {
    "gpt2": (GPT2_SPLIT,), "gpt-2": (GPT2_SPLIT,), "default": (GPT2_SPLIT,),
    "smollm": (DIGIT_SPLIT, GPT2_SPLIT), "starcoder": (DIGIT_SPLIT, GPT2_SPLIT),
    "refact": (DIGIT_SPLIT, GPT2_SPLIT),
}
# tokens after which llama.cpp stops generating when the vocabulary marks them as control tokens
END_OF_GENERATION_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
                            "<end_of_turn>", "</s>")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map: printable Latin-1 bytes stand for
    themselves, the other 68 bytes take the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in kept}
    moved = [b for b in range(256) if b not in alphabet]
    alphabet.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return dict(sorted(alphabet.items()))


def byte_level_pre_tokenizer(kind: str | None):
    """The pre-tokenizer for a GGUF `tokenizer.ggml.pre` name (None: GPT-2's)."""
    splits = PRE_TOKENIZER_SPLITS.get(kind or "default")
    if splits is None:
        raise ValueError(f"GGUF pre-tokenizer {kind!r} is not supported "
                         f"(supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))})")
    steps = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the special ids the engine needs. `encode` adds BOS only when
    `add_bos` (the tokenizer's metadata asks for it; SmolLM2: no); special tokens written in the text
    are recognised; `post_process` runs the file's post-processor too (SmartLLM's seed encodes so).
    `stop_token_ids` are kept as given, in order (None entries dropped)."""

    def __init__(self, tokenizer: Tokenizer, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool = False, chat_template: str | None = None, stop_token_ids: Iterable[int] = (),
                 post_process: bool = False):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.post_process = post_process
        self.stop_token_ids = tuple(dict.fromkeys(t for t in stop_token_ids if t is not None))
        self.special_token_ids = frozenset(
            i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL (encode does not), so a long prompt does not stall the server
        ids = self.tokenizer.encode_batch([text], add_special_tokens=self.post_process)[0].ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    # ---- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, source: Any) -> "TextTokenizer":
        """A byte-level BPE (`tokenizer.ggml.model` = gpt2) from GGUF metadata: a `GGUFReader`, or a
        mapping of `tokenizer.*` keys to plain values (tokens, merges, token types, special ids)."""
        if isinstance(source, Mapping):
            fields = source
        else:
            fields = {k: f.contents() for k, f in source.fields.items() if k.startswith("tokenizer.")}
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
        tokens = list(fields.get("tokenizer.ggml.tokens") or ())
        merges = fields.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ValueError("GGUF tokenizer metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        types = list(fields.get("tokenizer.ggml.token_type") or [GGUF_NORMAL_TOKEN] * len(tokens))
        alphabet = byte_alphabet()
        spelled = set(alphabet.values())
        vocab: dict[str, int] = {}
        for index, token in enumerate(tokens):
            if not set(token) <= spelled:   # stored as plain text: spell it in the byte alphabet
                token = "".join(alphabet[b] for b in token.encode("utf-8"))
            vocab.setdefault(token, index)
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        tokenizer.pre_tokenizer = byte_level_pre_tokenizer(fields.get("tokenizer.ggml.pre"))
        tokenizer.decoder = decoders.ByteLevel()
        control = [i for i, t in enumerate(types) if t == GGUF_CONTROL_TOKEN]
        user_defined = [i for i, t in enumerate(types) if t == GGUF_USER_DEFINED_TOKEN]
        tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
        if user_defined:
            tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_defined])
        stops = [fields.get("tokenizer.ggml.eot_token_id"), fields.get("tokenizer.ggml.eom_token_id")]
        stops += [i for i in control if tokens[i] in END_OF_GENERATION_TOKENS]
        return cls(tokenizer, _opt_int(fields.get("tokenizer.ggml.bos_token_id")),
                   _opt_int(fields.get("tokenizer.ggml.eos_token_id")),
                   add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=fields.get("tokenizer.chat_template"),
                   stop_token_ids=_stops_besides_eos(stops, _opt_int(fields.get("tokenizer.ggml.eos_token_id"))))

    from_gguf_reader = from_gguf_metadata   # the older name

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
        if template is None and (path.parent / "chat_template.jinja").is_file():
            template = (path.parent / "chat_template.jinja").read_text()
        specials = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
        stops = [tokenizer.token_to_id(t) for t in END_OF_GENERATION_TOKENS]
        return cls(tokenizer, special_id("bos_token"), eos, add_bos=bool(config.get("add_bos_token", False)),
                   chat_template=template, stop_token_ids=_stops_besides_eos([t for t in stops if t in specials], eos))


def _opt_int(value) -> int | None:
    return None if value is None else int(value)


def _stops_besides_eos(stops: Iterable[int | None], eos: int | None) -> list[int]:
    """The end-of-generation ids other than EOS (which the engine always stops on), sorted."""
    return sorted({t for t in stops if t is not None and t != eos})


SEED_TOKENIZER_FILES = ("tokenizer.json", "smart-bpe-tokenizer.json", "fallback-tokenizer.json",
                        "tokenizer/bpe_tokenizer.json", "bpe_tokenizer.json")


def load_tokenizer(path: str | Path, byte_level_decoder: bool = False) -> TokenizerProtocol:
    """A .gguf file, a tokenizer.json, SmartLLM's BPE or character-level file (told apart by their
    content, not their names), or a directory holding one of those. `byte_level_decoder` adds a
    ByteLevel decoder to SmartLLM's BPE file, which has none (readable text instead of the seed's)."""
    from model.text.seed_tokenizers import detect_tokenizer_kind, load_seed_tokenizer

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
        return TextTokenizer.from_gguf_metadata(GGUFReader(str(path)))
    if kind in ("smart_llm_bpe", "smart_llm_char"):
        return load_seed_tokenizer(path, byte_level_decoder=byte_level_decoder)
    try:
        tokenizer = TextTokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises its own exception types
        raise ValueError(f"{path} is not a tokenizer.json the tokenizers library can read: {exc}") from None
    if tokenizer.eos_token_id is None:          # ShomsherLLM's file names its only special `<eos>`
        tokenizer.eos_token_id = tokenizer.token_to_id("<eos>")
    return tokenizer
