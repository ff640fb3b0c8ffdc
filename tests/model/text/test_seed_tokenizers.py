"""SmartLLM's BPE and character-level tokenizer files, ShomsherLLM's Bengali BPE, the SmartLLM chat format,
and telling the formats apart by content. The files are built here with the
seeds' own pipelines (the `tokenizers` library, the fallback's JSON layout)."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from model.text.chat_template import ChatTemplate
from model.text.protocol import Tokenizer as TokenizerProtocol
from model.text.seed_tokenizers import (
    SPECIALS, CharFallbackTokenizer, detect_tokenizer_kind, load_seed_tokenizer, smart_bpe_tokenizer,
    smart_llm_chat_template,
)
from model.text.tokenizer import TextTokenizer
from tests.seed_files import write_bengali_bpe, write_smart_bpe

@pytest.fixture(scope="module")
def smart_bpe_path(tmp_path_factory):
    return write_smart_bpe(tmp_path_factory.mktemp("smart") / "smart-bpe-tokenizer.json")


@pytest.fixture(scope="module")
def fallback_path(tmp_path_factory):
    """The layout of the seed's FallbackCharTokenizer.save: specials, then chr(c) → 7 + c."""
    specials = {token: i for i, token in enumerate(SPECIALS)}
    char_to_token = dict(specials)
    for c in range(256):
        char_to_token[chr(c)] = len(SPECIALS) + c
    path = tmp_path_factory.mktemp("fallback") / "fallback-tokenizer.json"
    path.write_text(json.dumps({"char_to_token": char_to_token, "special_tokens": specials},
                               ensure_ascii=False, indent=2), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bengali_path(tmp_path_factory):
    return write_bengali_bpe(tmp_path_factory.mktemp("bengali") / "bpe_tokenizer.json")


# ---- SmartLLM BPE -------------------------------------------------------------------------------
def test_bpe_file_decodes_as_the_seed_does(smart_bpe_path):
    """No decoder: the tokens joined by spaces, byte symbols such as Ġ kept, specials skipped."""
    ours = smart_bpe_tokenizer(smart_bpe_path)
    plain = Tokenizer.from_file(str(smart_bpe_path))           # what the seed's decode calls
    text = "The capital of France is Paris. 42!"
    ids = ours.encode(text)
    assert ids == plain.encode(text).ids
    tokens = [plain.id_to_token(i) for i in ids]
    assert ours.decode(ids) == plain.decode(ids) == " ".join(tokens)
    assert "Ġ" in ours.decode(ids) and ours.decode(ids).startswith("Ġthe")
    assert ours.decode([2] + ids + [3]) == ours.decode(ids)
    assert ours.decode([2] + ids, skip_special_tokens=False) == "<bos> " + " ".join(tokens)


def test_bpe_byte_level_decoder_is_opt_in(smart_bpe_path):
    readable = smart_bpe_tokenizer(smart_bpe_path, byte_level_decoder=True)
    ids = readable.encode("The Capital of France is Paris, 42!")
    assert readable.decode(ids) == " the capital of france is paris, 42!"  # the normaliser lowercased it
    assert smart_bpe_tokenizer(smart_bpe_path).decode(ids) != readable.decode(ids)
    assert load_seed_tokenizer(smart_bpe_path, byte_level_decoder=True).decode(ids) == readable.decode(ids)
    # and from the server's side: `--byte-level-decoder` reaches the file through load_tokenizer
    from model.text.tokenizer import load_tokenizer
    from server.cli.main import build_parser
    from server.cli.serve import config_from_args
    args = build_parser().parse_args(["serve", "--tokenizer", str(smart_bpe_path), "--byte-level-decoder"])
    mcfg = config_from_args(args).model
    assert mcfg.byte_level_decoder
    assert load_tokenizer(mcfg.tokenizer, mcfg.byte_level_decoder).decode(ids) == readable.decode(ids)
    assert "Ġ" in load_tokenizer(mcfg.tokenizer).decode(ids)


def test_bpe_specials_and_ids(smart_bpe_path):
    tok = load_seed_tokenizer(smart_bpe_path)
    assert isinstance(tok, TextTokenizer) and isinstance(tok, TokenizerProtocol)   # SmartLLM's BPE is a TextTokenizer
    assert tok.chat_template == smart_llm_chat_template() and not tok.add_bos     # with the seed's settings
    assert [tok.id_to_token(i) for i in range(7)] == list(SPECIALS)
    assert (tok.bos_token_id, tok.eos_token_id) == (2, 3)
    assert set(tok.stop_token_ids) == {3, 4}
    assert tok.vocab_size == Tokenizer.from_file(str(smart_bpe_path)).get_vocab_size()
    ids = tok.encode("<user>hi<assistant>")      # specials inside prompt text are recognised
    assert ids[0] == 4 and ids[-1] == 5 and 4 not in ids[1:-1]
    assert tok.encode("hi")[0] != tok.bos_token_id  # no BOS added
    assert tok.encode("☃")[1:] == [1, 1, 1]        # bytes outside the learned alphabet: <unk> each


def test_chat_template_renders_the_seed_prompt(smart_bpe_path):
    template = ChatTemplate(smart_llm_chat_template())
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Spain?"}]
    text = template.render(messages, add_generation_prompt=True)
    assert text == "<bos><user>What is the capital of France?<assistant>Paris.<user>And of Spain?<assistant>"
    tok = smart_bpe_tokenizer(smart_bpe_path)
    # the seed: [bos id] + encode("<user>{u}<assistant>{r}" per past turn + "<user>{msg}<assistant>")
    seed_ids = [2] + tok.encode("<user>What is the capital of France?<assistant>Paris.<user>And of Spain?<assistant>")
    assert tok.encode(text) == seed_ids
    assert template.render(messages[:1], add_generation_prompt=False) == "<bos><user>What is the capital of France?"
    assert template.render([{"role": "system", "content": "Be brief."}, messages[0]]) \
        == "<bos><system>Be brief.<user>What is the capital of France?<assistant>"
    with pytest.raises(ValueError, match="not tool"):
        template.render([{"role": "tool", "content": "x"}])
    assert tok.chat_template == smart_llm_chat_template()


# ---- SmartLLM character-level fallback ------------------------------------------------------------
def test_fallback_encodes_one_id_per_character(fallback_path):
    tok = load_seed_tokenizer(fallback_path)
    assert isinstance(tok, CharFallbackTokenizer) and isinstance(tok, TokenizerProtocol)
    assert tok.vocab_size == 263
    assert tok.encode("Hé!") == [7 + ord("H"), 7 + ord("é"), 7 + ord("!")]
    assert tok.encode("€ক") == [1, 1]                                # beyond chr(255): <unk>
    assert tok.encode("a<eos>") == [7 + ord(c) for c in "a<eos>"]    # specials in text stay characters
    assert (tok.bos_token_id, tok.eos_token_id, tok.stop_token_ids) == (2, 3, (3, 4))
    assert tok.id_to_token(7 + ord("x")) == "x" and tok.id_to_token(5) == "<assistant>"


def test_fallback_decodes_specials_literally(fallback_path):
    tok = CharFallbackTokenizer.from_file(fallback_path)
    ids = [2] + tok.encode("hi") + [5, 3, 9999]
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>hi<assistant><eos>"  # the seed's output
    assert tok.decode(ids) == "hi"                                                  # the server's default
    assert tok.decode(tok.encode("Ünïcödé ÿ")) == "Ünïcödé ÿ"


def test_fallback_chat_prompt_is_the_seeds(fallback_path):
    """The seed prepends the bos id, then encodes the conversation character by character."""
    tok = CharFallbackTokenizer.from_file(fallback_path)
    text = ChatTemplate(tok.chat_template).render([{"role": "user", "content": "hi"}])
    assert tok.encode(text) == [2] + [7 + ord(c) for c in "<user>hi<assistant>"]


def test_fallback_rejects_a_wrong_layout():
    with pytest.raises(ValueError, match="char_to_token"):
        CharFallbackTokenizer.from_dict({"vocab": {}})
    with pytest.raises(ValueError, match="lack <bos>, <eos>"):
        CharFallbackTokenizer.from_dict({"char_to_token": {"a": 7}, "special_tokens": {"<unk>": 1}})


# ---- detection by content ----------------------------------------------------------------------------
def test_formats_are_told_apart_by_content(tmp_path, smart_bpe_path, fallback_path, bengali_path):
    # names that say nothing: only the content decides
    for source, kind in [(smart_bpe_path, "smart_llm_bpe"), (fallback_path, "smart_llm_char"),
                         (bengali_path, "tokenizers_json")]:
        renamed = tmp_path / f"{kind}.dat"
        renamed.write_bytes(source.read_bytes())
        assert detect_tokenizer_kind(renamed) == kind
    gguf = tmp_path / "model.bin"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(16))
    assert detect_tokenizer_kind(gguf) == "gguf"
    for name, content in [("list.json", "[1, 2]"), ("other.json", '{"vocab": {}}'), ("bad.json", "not json")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match="not a tokenizer file|neither a GGUF"):
            detect_tokenizer_kind(tmp_path / name)
    with pytest.raises(ValueError, match="not one of SmartLLM's"):
        load_seed_tokenizer(bengali_path)
    with pytest.raises(ValueError, match="is not a file"):
        detect_tokenizer_kind(tmp_path / "missing.json")


# ---- ShomsherLLM's Bengali BPE ----------------------------------------------------------------------
def test_bengali_bpe_works_with_tokenizers_directly(bengali_path):
    tok = Tokenizer.from_file(str(bengali_path))
    assert tok.token_to_id("<eos>") == 0 and tok.get_vocab_size() <= 150
    text = "বাংলা ভাষা খুব সুন্দর।"
    ids = tok.encode(text + "<eos>").ids
    assert ids[-1] == 0 and 0 not in ids[:-1]
    assert tok.decode(ids) == " " + text                        # the prefix space stays, as in the seed
    assert tok.decode(ids, skip_special_tokens=False) == " " + text + "<eos>"
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert partial, "some tokens hold part of a UTF-8 character: streaming must hold them back"
    # characters outside the learned byte symbols are silently dropped (no unk token)
    assert tok.encode("xyz").tokens == ["Ġ"]
    assert tok.encode("xyz আমি").ids == tok.encode("xyz").ids + tok.encode("আমি").ids


def test_bengali_bpe_streams_through_the_server_tokenizer(bengali_path):
    """Decoding through model/text/tokenizer.py (the tokenizer.json loader) and the incremental detokenizer
    gives the whole text, never a broken character."""
    from model.text.tokenizer import load_tokenizer
    from server.engine.detokenizer import IncrementalDetokenizer
    tok = load_tokenizer(bengali_path)
    text = "আমি বাংলায় গান গাই। আজকে সকালে বৃষ্টি হয়েছে!"
    ids = tok.encode(text)
    assert tok.decode(ids) == Tokenizer.from_file(str(bengali_path)).decode(ids)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == " " + text
    assert not any("\ufffd" in p for p in pieces)
