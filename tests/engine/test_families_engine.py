"""The other seed families through the engine: greedy decoding follows each family's oracle, with
SmartLLM's sliding window smaller than the context."""
from __future__ import annotations

import asyncio

import pytest
import torch

from model.config import preset
from server.engine.request import GenerationRequest, SamplingParams
from tests.helpers import collect, tiny_engine


@pytest.mark.parametrize("name", ["shomsher-tiny", "smart-llm-tiny"])
def test_greedy_decoding_through_the_engine_follows_full_forward(name):
    config = preset(name)
    if name == "smart-llm-tiny":
        assert config.sliding_window is not None
    engine = tiny_engine(config=config, num_blocks=64, block_size=4, std=0.2)
    try:
        prompt = [(5 * i + 3) % config.vocab_size for i in range(11)]
        _, _, tokens = asyncio.run(collect(engine, GenerationRequest(name, prompt, SamplingParams(
            max_tokens=14, temperature=0.0, ignore_eos=True))))
        seq = list(prompt)
        with torch.no_grad():
            for token in tokens:
                assert token == int(engine.model.forward_full(torch.tensor([seq]))[0, -1].argmax())
                seq.append(token)
        assert len(seq) > (getattr(config, "sliding_window", None) or 0) + 4
        engine.flush_inbox()
        engine.check_integrity()
    finally:
        engine.stop()
