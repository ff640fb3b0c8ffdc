"""The built-in SmolLM2-135M-Instruct against an independent implementation: Hugging Face
transformers loading the same GGUF (float32, CPU). Greedy outputs must be equal token for token."""
from __future__ import annotations

import asyncio
import os

import pytest
import torch

from model.builtin import builtin_model_path
from server.config import EngineConfig, ModelLoadConfig, ServerConfig
from server.serving import build_engine
from server.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital city of France is called", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
    "In painting, the three primary colors are", "To make a cup of tea, first", "import numpy as np\n\nx = np.",
    "Water boils at a temperature of", "The largest planet in our solar system", "In 1969, astronauts",
    "Photosynthesis is the process by which", "A haiku about autumn:\n", "SELECT name, age FROM users WHERE",
    "The French word for cheese is", "Newton's second law states that", "List three fruits: apple,",
    "The quick brown fox jumps over the", "Q: What is 12 times 12?\nA:", "My favourite book of all time is", "HTTP status code 404 means",
    "Les enfants jouent dans le",
]
NEW_TOKENS = 64
PROMPT_TOKENS = 6   # every prompt cut to the same length, so transformers runs them as one unpadded batch
TIE_GAP = 1e-3      # logit gap below which two implementations may break a tie differently


@pytest.fixture(scope="module")
def engine():
    engine = build_engine(ServerConfig(model=ModelLoadConfig(dtype="float32", device="cpu"),
                                       engine=EngineConfig(kv_cache_memory_gib=0.5, max_num_seqs=32)))
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def hf_model():
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    path = builtin_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


async def generate_all(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    async def one(i, ids):
        tokens = []
        async for out in engine.generate(GenerationRequest(f"ref-{i}", ids, SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True))):
            tokens += out.token_ids
        return tokens
    return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))


def test_greedy_outputs_equal_transformers(engine, hf_model):
    prompts = [engine.tokenizer.encode(p)[:PROMPT_TOKENS] for p in PROMPTS]
    assert all(len(p) == PROMPT_TOKENS for p in prompts)
    ours = asyncio.run(generate_all(engine, prompts, NEW_TOKENS))
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor(prompts), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False, output_scores=True, return_dict_in_generate=True,
                                pad_token_id=2)
    theirs = out.sequences[:, PROMPT_TOKENS:].tolist()
    scores = torch.stack(out.scores, dim=1)                                 # [20, 64, V]
    exact = 0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        for step, (x, y) in enumerate(zip(a, b)):
            if x != y:
                gap = float(scores[i, step, y] - scores[i, step, x])
                assert gap < TIE_GAP, f"prompt {i} diverges at step {step}: ours {x}, transformers {y} (gap {gap:.4f})"
                break
        else:
            exact += 1
    assert exact >= len(PROMPTS) - 1, f"only {exact} of {len(PROMPTS)} sequences equal"


def test_asked_for_the_capital_of_france_it_says_paris(engine):
    text = engine.chat_template.render([{"role": "user", "content": "What is the capital of France?"}])
    ids = engine.tokenizer.encode(text)

    async def run():
        out_text = ""
        async for out in engine.generate(GenerationRequest("paris", ids, SamplingParams(max_tokens=24,
                                                                                        temperature=0.0))):
            out_text += out.text
            if out.finished:
                assert out.finish_reason == "stop"
        return out_text
    answer = asyncio.run(run())
    assert "Paris" in answer, answer
