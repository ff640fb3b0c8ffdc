"""The built-in SmolLM2-135M-Instruct against an independent implementation: Hugging Face transformers
loading the same GGUF (float32, CPU).

- the dequantised weights are identical, and `forward_full`'s logits are within float noise of HF's;
- greedy decoding of 20 varied prompts × 64 tokens, ours through `forward_paged` over a paged
  `KVCache` (all 20 sequences in one batch per step, block size 16), equals HF `generate` token for
  token, and so does the serving engine;
- asked "What is the capital of France?" through the chat template, it answers with Paris.
"""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from model.text.chat_template import ChatTemplate
from model.cache.kv_cache import KVCache
from model.cache.batch import PagedBatch, SequenceChunk
from tests.default_model import builtin_float32_model, default_gguf_path, hf_offline

pytestmark = pytest.mark.slow

BLOCK = 16
NEW_TOKENS = 64
LOGIT_TOLERANCE = 2e-3      # max |ours - HF| over whole vocabularies (observed ≈ 6e-5; logits span ±30)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    "The capital city of France is called",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village at the foot of the mountains, there lived an old clockmaker who",
    "In painting, the three primary colors are",
    "To make a cup of tea, first",
    "import numpy as np\n\nx = np.",
    "Water boils at a temperature of 100",
    "Q: What is 12 times 12?\nA:",
    "SELECT name, age FROM users WHERE",
    "A haiku about autumn:\n",
    "Les enfants jouent dans le",
    "The French word for cheese is",
    "1, 2, 3, 5, 8, 13,",
    "<html>\n  <head>\n    <title>",
    "Newton's second law states that",
    "My favourite book of all time is",
    "HTTP status code 404 means",
    "Photosynthesis",
    "List three fruits: apple,",
    None,   # the chat-formatted question, rendered with the model's template
]


@pytest.fixture(scope="module")
def ours():
    return builtin_float32_model()


@pytest.fixture(scope="module")
def prompts(ours) -> list[list[int]]:
    chat = ChatTemplate(ours.chat_template).render(CHAT, add_generation_prompt=True)
    return [ours.tokenizer.encode(chat if p is None else p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_model():
    hf_offline()
    transformers = pytest.importorskip("transformers")
    path = default_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts):
    """HF generate over all prompts at once (left-padded), never stopping at eos: (tokens, scores)."""
    width = max(len(p) for p in prompts)
    pad = 2
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])             # [20, W]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])          # [20, W]
    started = time.monotonic()
    with torch.inference_mode():
        out = hf_model.generate(input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=pad, output_scores=True, return_dict_in_generate=True)
    print(f"\nHF generate: {len(prompts)} x {NEW_TOKENS} tokens in {time.monotonic() - started:.1f} s")
    return out.sequences[:, width:].tolist(), torch.stack(out.scores, dim=1)               # [20, 64, V]


@torch.inference_mode()
def paged_greedy(model, prompts: list[list[int]], new_tokens: int, stop_ids: tuple[int, ...] = ()):
    """A plain greedy loop over `forward_paged`: one step = every unfinished sequence's new tokens in
    one flat batch (the whole prompt at first, then one token each). Blocks are laid out one run per
    sequence. Returns the generated ids per prompt."""
    cfg = model.config
    blocks_each = [-(-(len(p) + new_tokens) // BLOCK) for p in prompts]
    cache = KVCache(cfg, num_blocks=sum(blocks_each), block_size=BLOCK, dtype=torch.float32)
    starts = [sum(blocks_each[:i]) for i in range(len(prompts))]
    tables = [list(range(s, s + n)) for s, n in zip(starts, blocks_each)]
    tokens = [list(p) for p in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    pending = [list(p) for p in prompts]            # the tokens each sequence computes next step
    live = list(range(len(prompts)))
    while live:
        chunks = []
        for i in live:
            start = len(tokens[i]) - len(pending[i])
            chunks.append(SequenceChunk(pending[i], start, tables[i][: -(-len(tokens[i]) // BLOCK)]))
        logits = model.forward_paged(PagedBatch.build(chunks, BLOCK), cache.layers)       # [live, V]
        for i, token in zip(live, logits.argmax(dim=-1).tolist()):
            generated[i].append(token)
            tokens[i].append(token)
            pending[i] = [token]
        live = [i for i in live if len(generated[i]) < new_tokens and generated[i][-1] not in stop_ids]
    return generated


def test_weights_equal_transformers(ours, hf_model):
    theirs = hf_model.state_dict()
    mine = ours.model.state_dict()
    assert set(theirs) - set(mine) == {"lm_head.weight"}                     # tied: HF lists the shared head
    assert torch.equal(theirs["lm_head.weight"], mine["model.embed_tokens.weight"])
    for key, tensor in mine.items():
        assert torch.equal(tensor, theirs[key]), key


def test_full_forward_logits_close_to_transformers(ours, hf_model, prompts):
    worst = 0.0
    with torch.inference_mode():
        for ids in prompts[:6]:
            x = torch.tensor([ids])
            diff = float((ours.model.forward_full(x) - hf_model(x).logits).abs().max())
            worst = max(worst, diff)
    print(f"\nmax |logit difference| over 6 prompts, every position: {worst:.2e}")
    assert worst < LOGIT_TOLERANCE


def test_paged_greedy_equals_transformers_generate(ours, prompts, hf_greedy):
    started = time.monotonic()
    mine = paged_greedy(ours.model, prompts, NEW_TOKENS)
    print(f"\nours (forward_paged): {len(prompts)} x {NEW_TOKENS} tokens in {time.monotonic() - started:.1f} s")
    assert_equal_to_reference(mine, *hf_greedy)


def assert_equal_to_reference(mine: list[list[int]], theirs: list[list[int]], scores: torch.Tensor):
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            step = next(s for s, (x, y) in enumerate(zip(a, b)) if x != y)
            gap = float(scores[i, step, b[step]] - scores[i, step, a[step]])
            pytest.fail(f"prompt {i} diverges at step {step}: ours {a[step]}, transformers {b[step]} "
                        f"(transformers' logit gap between the two: {gap:.2e})")


def test_asked_for_the_capital_of_france_it_says_paris(ours, prompts):
    ids = paged_greedy(ours.model, [prompts[-1]], 32, stop_ids=(ours.tokenizer.eos_token_id,))[0]
    assert ids[-1] == ours.tokenizer.eos_token_id == 2                        # ends its turn with <|im_end|>
    answer = ours.tokenizer.decode(ids)
    print(f"\nanswer: {answer!r}")
    assert "Paris" in answer, answer


def test_serving_engine_greedy_equals_transformers(prompts, hf_greedy):
    """The same prompts through the engine (scheduler, runner, sampler at temperature 0)."""
    from server.config import EngineConfig, ModelLoadConfig, ServerConfig
    from server.executor.build import build_engine
    from server.engine.request import GenerationRequest, SamplingParams

    engine = build_engine(ServerConfig(model=ModelLoadConfig(model=str(default_gguf_path()), dtype="float32",
                                                             device="cpu"),
                                       engine=EngineConfig(kv_cache_memory_gib=0.25, max_num_seqs=32)))

    async def one(i, ids):
        tokens = []
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(GenerationRequest(f"ref-{i}", ids, params)):
            tokens += out.token_ids
        return tokens

    async def everything():
        return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))

    try:
        mine = asyncio.run(everything())
    finally:
        engine.stop()
    assert_equal_to_reference(mine, *hf_greedy)
