"""SmartLLM's two tokenizer files, each a `model.text.protocol.Tokenizer`, and telling tokenizer
formats apart by content.

- BPE (`smart-bpe-tokenizer.json`, a `tokenizers` file): a `TextTokenizer` with the seed's settings
  (`smart_bpe_tokenizer`). The file has no decoder, so decoding joins the tokens with spaces and
  keeps byte symbols such as `Ġ`: that is the seed's text. A ByteLevel decoder reads better but is
  not the seed's output: `byte_level_decoder=True` opts in.
- Character-level fallback (`fallback-tokenizer.json`): `{"char_to_token": {...}, "special_tokens": {...}}`,
  the 7 specials then `chr(c)` → 7 + c for c < 256; anything else is `<unk>`; specials written in the
  text stay characters; special ids decode to their literal strings.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders

from model.text.tokenizer import TextTokenizer

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>", "<system>")
CHAT_TEMPLATE_PATH = Path(__file__).parent / "chat_templates" / "smart_llm.jinja"
GGUF_MAGIC = b"GGUF"


def smart_llm_chat_template() -> str:
    """`<bos>` + `<{role}>{content}` per message (+ `<assistant>` to prompt a reply): the seed's chat format."""
    return CHAT_TEMPLATE_PATH.read_text()


def smart_bpe_tokenizer(path: str | Path, byte_level_decoder: bool = False) -> TextTokenizer:
    """The seed's BPE file as a `TextTokenizer` with its settings: specials (ids 0-6) are recognised
    inside text; no BOS is added by encoding, which runs the file's post-processor as the seed's
    `encode` call does (its file has none); generation stops on `<eos>` and `<user>`, as the
    seed's chat loop does; the chat template is the seed's format."""
    tokenizer = Tokenizer.from_file(str(path))
    if byte_level_decoder:
        tokenizer.decoder = decoders.ByteLevel()
    eos = tokenizer.token_to_id("<eos>")
    return TextTokenizer(tokenizer, tokenizer.token_to_id("<bos>"), eos, add_bos=False,
                         chat_template=smart_llm_chat_template(),
                         stop_token_ids=(eos, tokenizer.token_to_id("<user>")), post_process=True)


class CharFallbackTokenizer:
    """The seed's character-level fallback.

    As the seed: one id per character, `<unk>` for characters outside the table, specials written in
    the text are characters. One addition for the chat path: a `<bos>` at the very start of the text
    (what the chat template renders) becomes the bos id, as the seed's chat loop prepends that id
    before the character-encoded conversation. Decoding with `skip_special_tokens=False` writes special
    ids as their literal strings (the seed's output); with True (the server's default) it leaves them
    out. Ids outside the table decode to nothing. Stops: `<eos>` and `<user>` (the seed's chat reply is
    cut at a decoded `<user>`, so stopping there gives the same text).
    """

    def __init__(self, char_to_token: dict[str, int], special_tokens: dict[str, int]):
        missing = [s for s in ("<unk>", "<bos>", "<eos>") if s not in special_tokens]
        if missing:
            raise ValueError(f"the fallback tokenizer's special_tokens lack {', '.join(missing)}")
        self.char_to_token = {k: int(v) for k, v in char_to_token.items()}
        self.special_tokens = {k: int(v) for k, v in special_tokens.items()}
        self.token_to_char = {v: k for k, v in self.char_to_token.items()}
        self.add_bos = False
        self.unk_token_id = self.special_tokens["<unk>"]
        self.bos_token_id = self.special_tokens["<bos>"]
        self.eos_token_id = self.special_tokens["<eos>"]
        self.stop_token_ids = tuple(self.special_tokens[s] for s in ("<eos>", "<user>") if s in self.special_tokens)
        self.special_token_ids = frozenset(self.special_tokens.values())
        self.chat_template = smart_llm_chat_template()

    @classmethod
    def from_dict(cls, data: dict) -> "CharFallbackTokenizer":
        if not (isinstance(data, dict) and isinstance(data.get("char_to_token"), dict)
                and isinstance(data.get("special_tokens"), dict)):
            raise ValueError('a fallback tokenizer file holds {"char_to_token": {...}, "special_tokens": {...}}')
        return cls(data["char_to_token"], data["special_tokens"])

    @classmethod
    def from_file(cls, path: str | Path) -> "CharFallbackTokenizer":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    @property
    def vocab_size(self) -> int:
        return len(self.token_to_char)

    def encode(self, text: str) -> list[int]:
        prefix = []
        if text.startswith("<bos>"):
            prefix, text = [self.bos_token_id], text[len("<bos>"):]
        return prefix + [self.char_to_token.get(ch, self.unk_token_id) for ch in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        skip = self.special_token_ids if skip_special_tokens else frozenset()
        return "".join(self.token_to_char.get(int(i), "") for i in ids if int(i) not in skip)

    def id_to_token(self, token_id: int) -> str | None:
        return self.token_to_char.get(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.char_to_token.get(token)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: neither a GGUF file nor a JSON tokenizer file ({exc})") from None


def detect_tokenizer_kind(path: str | Path) -> str:
    """What a tokenizer file is, by its content (not its name):

    - `"gguf"`: a GGUF file (magic bytes);
    - `"smart_llm_char"`: SmartLLM's character-level fallback JSON;
    - `"smart_llm_bpe"`: a `tokenizers` file whose ids 0-6 are SmartLLM's specials;
    - `"tokenizers_json"`: any other `tokenizers` file (ShomsherLLM's, cosmo2, …).
    Anything else raises ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer {path} is not a file")
    with path.open("rb") as handle:
        if handle.read(4) == GGUF_MAGIC:
            return "gguf"
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("char_to_token"), dict) \
            and isinstance(data.get("special_tokens"), dict):
        return "smart_llm_char"
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        added = {t.get("content"): t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict)}
        if all(added.get(token) == i for i, token in enumerate(SPECIALS)):
            return "smart_llm_bpe"
        return "tokenizers_json"
    raise ValueError(f"{path}: not a tokenizer file this server reads (a tokenizers JSON, SmartLLM's "
                     '{"char_to_token", "special_tokens"} JSON, or GGUF)')


def load_seed_tokenizer(path: str | Path, byte_level_decoder: bool = False) -> TextTokenizer | CharFallbackTokenizer:
    """SmartLLM's BPE or fallback file; ValueError for any other kind."""
    kind = detect_tokenizer_kind(path)
    if kind == "smart_llm_bpe":
        return smart_bpe_tokenizer(path, byte_level_decoder)
    if kind == "smart_llm_char":
        return CharFallbackTokenizer.from_file(path)
    raise ValueError(f"{path} is a {kind} tokenizer, not one of SmartLLM's")
