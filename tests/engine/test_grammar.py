"""Grammar-constrained decoding (server/engine/grammar.py, the GrammarMask processor, output
processing): the byte view of every tokenizer the server loads, compile errors that name the
problem, the mask applied to constrained rows only, and constrained generation through the engine of
every family, whose outputs always validate whatever the (random) weights; the wrap-up near the end
of max_tokens (a subset of the grammar's mask, answers that finish valid within a small budget,
closing paths for the bench schemas)."""
from __future__ import annotations

import asyncio
import json
import random

import jsonschema
import numpy as np
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
from tests.default_model import builtin_tokenizer
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
    tokenizer = builtin_tokenizer()
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
             ("llama-tiny", builtin_tokenizer())]
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


# Wrap-up (GrammarState with a budget): near the end of max_tokens the mask follows a closing path.
FREE_TEXT = {"type": "object", "properties": {
    "title": {"type": "string"}, "notes": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    "score": {"type": "number"}}, "required": ["title", "notes", "score"]}


def _allowed_ids(mask) -> set[int]:
    return set(np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")).tolist())


def test_a_mask_in_wrap_up_is_a_subset_of_the_grammars_and_completes_the_document_within_the_budget():
    vocab, budget = 512, 90
    compiler = GrammarCompiler(ByteTokenizer(vocab), vocab, (0,))
    grammar = compiler.compile(json_spec(FREE_TEXT))
    free, budgeted = grammar.start(), grammar.start(budget)
    text, narrowed_steps = b"", 0
    rambling = iter(b'{"title": "a long title that never seems to end, as small models write')
    while not budgeted.done:
        assert len(text) < budget, text
        wide, narrow = _allowed_ids(free.next_mask()), _allowed_ids(budgeted.next_mask())
        assert narrow and narrow <= wide                         # it only ever narrows the grammar's mask
        if budgeted.wrapping_up:
            narrowed_steps += 1
            assert len(narrow) == 1
            token = min(narrow)
        else:
            assert narrow == wide                                # untouched before the wrap-up
            token = next(rambling)
            assert token in wide
        free.advance(token)
        budgeted.advance(token)
        text += bytes([token])
        assert budgeted.error is None
    assert narrowed_steps > 0 and len(text) <= budget
    document = json.loads(text)
    jsonschema.validate(document, FREE_TEXT)
    assert document["title"].startswith("a long title")         # what was written before is kept
    compiler.close()


def test_without_a_budget_or_with_wrap_up_off_the_mask_is_never_narrowed():
    vocab = 512
    for compiler, budget in ((GrammarCompiler(ByteTokenizer(vocab), vocab, (0,)), None),
                             (GrammarCompiler(ByteTokenizer(vocab), vocab, (0,), wrap_up=False), 20)):
        grammar = compiler.compile(json_spec(FREE_TEXT))
        reference, state = grammar.start(), grammar.start(budget)
        for token in b'{"title": "words and more words and more words':
            assert np.array_equal(state.next_mask(), reference.next_mask())
            state.advance(token)
            reference.advance(token)
        assert not state.wrapping_up
        compiler.close()


def test_an_unconstrained_row_is_untouched_beside_a_row_in_wrap_up():
    vocab = 512
    compiler = GrammarCompiler(ByteTokenizer(vocab), vocab, (0,))
    grammar = compiler.compile(json_spec(FREE_TEXT))
    state = grammar.start(budget=45)      # 32 tokens left after the prefix: the closing distance (26) + the margin covers it
    for token in b'{"title": "ab':
        state.advance(token)
    plain = SamplingRow(SamplingParams(), [1], [], eos_token_ids=(0,))
    constrained = SamplingRow(SamplingParams(grammar=grammar), [1], [], eos_token_ids=(0,), grammar=state)
    logits = torch.randn(2, vocab)
    out = apply_logits_processors(logits, [plain, constrained])
    assert state.wrapping_up
    assert torch.equal(out[0], logits[0])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [ord('"')]   # the string is closed first
    compiler.close()


def test_a_closing_path_completes_every_bench_schema_from_random_prefixes():
    """On the built-in tokenizer, from random valid prefixes of the ten `bench structured` schemas."""
    from server.cli.bench.schemas import SCHEMAS
    from server.engine.grammar_closing import closing_path

    tokenizer = builtin_tokenizer()
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size, (tokenizer.token_to_id("<|im_end|>"),))
    rng = random.Random(3)
    for name, _, schema in SCHEMAS:
        grammar = compiler.compile(json_spec(schema))
        for _ in range(8):
            state = grammar.start()
            ids = []
            for _ in range(rng.randrange(60)):
                allowed = sorted(_allowed_ids(state.next_mask()) - set(compiler.eos_token_ids))
                if state.done or not allowed:
                    break
                ids.append(rng.choice(allowed))
                state.advance(ids[-1])
            if state.done:
                continue
            path = closing_path(state.matcher, compiler.closers())
            assert path is not None, (name, tokenizer.decode(ids))
            jsonschema.validate(json.loads(tokenizer.decode(ids + path)), schema)
    compiler.close()


def _generate_free_text(wrap_up: bool, max_tokens: int):
    engine = tiny_engine(num_blocks=256, grammar_wrap_up=wrap_up)
    try:
        return _generate(engine, engine.grammars.compile(json_spec(FREE_TEXT)), n=6, max_tokens=max_tokens)
    finally:
        engine.stop()


def test_constrained_answers_with_free_text_and_a_small_max_tokens_finish_valid():
    for outputs, text, tokens in _generate_free_text(True, 70):
        assert outputs[-1].finish_reason == "stop" and len(tokens) <= 70, (outputs[-1], text)
        jsonschema.validate(json.loads(text), FREE_TEXT)
    # the same requests without the wrap-up: the random model's free text runs into max_tokens
    assert any(outputs[-1].finish_reason == "length" for outputs, _, _ in _generate_free_text(False, 70))
