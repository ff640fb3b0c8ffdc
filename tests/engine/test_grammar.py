"""Grammar-constrained decoding (server/engine/grammar.py, the GrammarMask processor, output
processing): the byte view of every tokenizer the server loads, compile errors that name the
problem, the mask applied to constrained rows only, and constrained generation through the engine of
every family, whose outputs always validate whatever the (random) weights."""
from __future__ import annotations

import asyncio
import json
import random

import jsonschema
import pytest
import torch

from model.config import preset
from model.text.seed_tokenizers import CharFallbackTokenizer, smart_bpe_tokenizer
from model.text.token_bytes import NoByteView, token_bytes
from model.text.tokenizer import load_tokenizer
from server.api.structured import json_spec
from server.engine.grammar import GrammarCompiler, GrammarError, GrammarSpec
from server.engine.logits_processors import GrammarMask, MinTokens, apply_logits_processors, unpack_token_mask
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.sampler import SamplingRow
from tests.default_model import default_gguf_path
from tests.helpers import ByteTokenizer, collect, tiny_engine
from tests.seed_files import write_bengali_bpe, write_smart_bpe

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10}, "n": {"type": "integer", "minimum": -5, "maximum": 500},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "nested": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                  "required": ["ok"]}]}},
    "required": ["name", "n", "tags", "nested"]}


def char_tokenizer() -> CharFallbackTokenizer:
    specials = {s: i for i, s in enumerate(("<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>", "<system>"))}
    return CharFallbackTokenizer({**specials, **{chr(c): 7 + c for c in range(256)}}, specials)


def assert_round_trip(tokenizer, texts: list[str]) -> None:
    """Decoding any ids gives the concatenation of their bytes (what a grammar checks)."""
    view = token_bytes(tokenizer)
    for text in texts:
        ids = tokenizer.encode(text)
        joined = b"".join(view.tokens[i] for i in ids)
        assert joined.decode("utf-8") == tokenizer.decode(ids, skip_special_tokens=False), text
    rng = random.Random(0)
    normal = [i for i in range(tokenizer.vocab_size) if i not in view.special_ids and view.tokens[i]]
    for _ in range(20):
        ids = [rng.choice(normal) for _ in range(6)]
        joined = b"".join(view.tokens[i] for i in ids).decode("utf-8", errors="replace")
        assert joined == tokenizer.decode(ids, skip_special_tokens=False)


TEXTS = ["{\"a\": [1, 2.5e3], \"b\": \"Café — ok\"}", "  spaces\tand\nlines", "আমি বাংলায়"]


def test_the_byte_view_of_the_built_in_gguf_tokenizer():
    tokenizer = load_tokenizer(default_gguf_path())
    view = token_bytes(tokenizer)
    assert len(view.tokens) == tokenizer.vocab_size == 49152
    assert {tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|im_start|>")} <= view.special_ids
    assert_round_trip(tokenizer, TEXTS)


def test_the_byte_view_of_the_seed_files(tmp_path):
    assert_round_trip(load_tokenizer(write_bengali_bpe(tmp_path / "bengali.json")), TEXTS[2:])
    smart = write_smart_bpe(tmp_path / "smart.json")
    assert_round_trip(smart_bpe_tokenizer(smart, byte_level_decoder=True), ["the capital of france is paris."])
    with pytest.raises(NoByteView, match="--byte-level-decoder"):
        token_bytes(smart_bpe_tokenizer(smart))
    char = char_tokenizer()
    assert_round_trip(char, ["{\"é\": 1}", "plain"])
    assert token_bytes(char).tokens[7 + 0xE9] == "é".encode()


def test_compile_errors_name_the_problem_and_the_cache_returns_the_same_grammar():
    compiler = GrammarCompiler(ByteTokenizer(512), 512, (0,), cache_size=2)
    cases = [(json_spec({"not": {"type": "string"}}), "not"), (json_spec({"type": "string", "format": "weird"}), "weird"),
             (GrammarSpec("regex", "(a"), "unclosed group"), (GrammarSpec("choice", "[]"), "non-empty list"),
             (GrammarSpec("grammar", "start: nope"), "nope")]
    for spec, named in cases:
        with pytest.raises(GrammarError, match=named):
            compiler.compile(spec)
    first = compiler.compile(json_spec(SCHEMA))
    assert compiler.compile(json_spec(SCHEMA)) is first
    compiler.compile(GrammarSpec("regex", "a+"))
    compiler.compile(GrammarSpec("regex", "b+"))
    assert compiler.compile(json_spec(SCHEMA)) is not first            # evicted (LRU of 2)
    # a vocabulary that cannot spell the grammar: refused at compile time
    chars = GrammarCompiler(char_tokenizer(), 263, (3,))
    with pytest.raises(GrammarError, match="no token"):
        chars.compile(GrammarSpec("choice", json.dumps(["€"])))
    compiler.close()
    chars.close()


def test_a_tokenizer_without_a_byte_view_refuses_grammars_by_name():
    class Opaque:
        vocab_size = 10
        bos_token_id = None
        def encode(self, text): return []
    with pytest.raises(GrammarError, match="not available with this tokenizer"):
        GrammarCompiler(Opaque(), 10, (0,)).compile(GrammarSpec("regex", "a"))


def test_unpack_token_mask_matches_bit_by_bit():
    packed = torch.tensor([[0b1011, -1], [-(1 << 31), 0]], dtype=torch.int32)
    allowed = unpack_token_mask(packed, 40)
    assert allowed.shape == (2, 40)
    assert allowed[0, :4].tolist() == [True, True, False, True] and not allowed[0, 4:32].any()
    assert allowed[0, 32:].all() and allowed[1].nonzero().flatten().tolist() == [31]


def _rows(compiler: GrammarCompiler, vocab: int):
    grammar = compiler.compile(GrammarSpec("regex", "ab|c"))
    plain = SamplingRow(SamplingParams(), [1], [], eos_token_ids=(0,))
    constrained = SamplingRow(SamplingParams(grammar=grammar), [1], [], eos_token_ids=(0,), grammar=grammar.start())
    return plain, constrained


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_grammar_mask_touches_constrained_rows_only(device):
    vocab = 512
    compiler = GrammarCompiler(ByteTokenizer(vocab), vocab, (0,))
    plain, constrained = _rows(compiler, vocab)
    logits = torch.randn(3, vocab, device=device)
    out = apply_logits_processors(logits, [plain, constrained, plain])                      # [3, V]
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [ord("a"), ord("c")]
    assert torch.equal(out[1, [ord("a"), ord("c")]], logits[1, [ord("a"), ord("c")]])
    compiler.close()


def test_a_row_left_without_any_allowed_token_samples_among_the_grammars():
    vocab = 512
    compiler = GrammarCompiler(ByteTokenizer(vocab), vocab, (0,))
    grammar = compiler.compile(GrammarSpec("regex", "a"))
    state = grammar.start()
    state.advance(ord("a"))                      # complete: only end-of-sequence is allowed now
    row = SamplingRow(SamplingParams(min_tokens=5, grammar=grammar), [1], [ord("a")], eos_token_ids=(0,), grammar=state)
    out = apply_logits_processors(torch.randn(1, vocab), [row], (MinTokens(), GrammarMask()))
    assert out[0, 0] == 0 and torch.isinf(out[0, 1:]).all()
    compiler.close()


def _generate(engine, grammar, n: int, max_tokens: int = 120, temperature: float = 1.0):
    async def all_of():
        return await asyncio.gather(*(collect(engine, GenerationRequest(f"g{i}", [5, 6, 7, 8 + i], SamplingParams(
            max_tokens=max_tokens, temperature=temperature, seed=i, grammar=grammar))) for i in range(n)))
    return asyncio.run(all_of())


@pytest.mark.parametrize("name", ["custom-llm-tiny", "llama-tiny", "shomsher-tiny", "smart-llm-tiny"])
def test_every_family_generates_json_that_validates(name):
    engine = tiny_engine(config=preset(name), num_blocks=256, block_size=4, std=0.2)
    try:
        grammar = engine.grammars.compile(json_spec(SCHEMA))
        for outputs, text, tokens in _generate(engine, grammar, n=6):
            assert outputs[-1].finish_reason == "stop", (outputs[-1], text)
            jsonschema.validate(json.loads(text), SCHEMA)
            assert tokens[-1] != 0                       # ended by the grammar, without an extra EOS step
        engine.flush_inbox()
        engine.check_integrity()
    finally:
        engine.stop()


def test_a_constrained_request_cut_by_max_tokens_returns_what_it_generated_with_length():
    engine = tiny_engine(num_blocks=128)
    try:
        grammar = engine.grammars.compile(json_spec(SCHEMA))
        (outputs, text, tokens), = _generate(engine, grammar, n=1, max_tokens=5)
        assert outputs[-1].finish_reason == "length" and len(tokens) == 5
        assert text.startswith('{"name": "'[:len(text)]) and outputs[-1].error is None
    finally:
        engine.stop()


def test_a_grammar_the_vocabulary_cannot_finish_ends_the_request_with_an_error():
    """SmartLLM's character file has no "€": after "a" the grammar is at a dead end."""
    from server.engine.engine import Engine
    from server.config import EngineConfig
    from tests.helpers import make_cache, perturbed_model

    config = preset("smart-llm-tiny").replace(vocab_size=263)
    engine = Engine(perturbed_model(config, std=0.2), make_cache(config, 64, 4), char_tokenizer(),
                    EngineConfig(block_size=4), model_name="t")
    engine.start()
    try:
        grammar = engine.grammars.compile(GrammarSpec("choice", json.dumps(["a€"])))
        (outputs, text, _), = _generate(engine, grammar, n=1, max_tokens=10)
        assert outputs[-1].finish_reason == "error" and "cannot continue" in outputs[-1].error
        assert text == "a"
    finally:
        engine.stop()


def test_the_real_tokenizers_under_a_grammar(tmp_path):
    """SmartLLM's BPE (with its decoder) and character files drive a smart-llm-tiny model sized to
    them; the built-in GGUF tokenizer a llama-tiny of its vocabulary."""
    from server.engine.engine import Engine
    from server.config import EngineConfig
    from tests.helpers import make_cache, perturbed_model

    smart = write_smart_bpe(tmp_path / "smart.json", all_bytes=True)
    cases = [("smart-llm-tiny", smart_bpe_tokenizer(smart, byte_level_decoder=True)),
             ("smart-llm-tiny", char_tokenizer()),
             ("llama-tiny", load_tokenizer(default_gguf_path()))]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"]}
    for family, tokenizer in cases:
        config = preset(family).replace(vocab_size=tokenizer.vocab_size)
        engine = Engine(perturbed_model(config, std=0.2), make_cache(config, 64, 4), tokenizer,
                        EngineConfig(block_size=4), model_name="t")
        engine.start()
        try:
            grammar = engine.grammars.compile(json_spec(schema))
            for outputs, text, _ in _generate(engine, grammar, n=3, max_tokens=40):
                assert outputs[-1].finish_reason == "stop", (family, type(tokenizer), text)
                jsonschema.validate(json.loads(text), schema)
        finally:
            engine.stop()
