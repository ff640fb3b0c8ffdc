"""A 3-turn conversation in a session: each turn computes only its new tokens, and its logits equal
a cold run of the same prompt."""
from __future__ import annotations

import asyncio

from server.engine.results import NullObserver

from server.engine.request import GenerationRequest, SamplingParams
from tests.helpers import tiny_engine


class StepCounter(NullObserver):
    def __init__(self):
        self.tokens = 0

    def on_step(self, num_scheduled_tokens: int, shared: bool = False) -> None:
        self.tokens += num_scheduled_tokens


async def run(engine, request_id, prompt, tenant="", session=None):
    outputs = []
    async for out in engine.generate(GenerationRequest(request_id, prompt, SamplingParams(
            max_tokens=5, temperature=0.0, logprobs=20, ignore_eos=True), tenant=tenant, session_id=session)):
        outputs.append(out)
    return outputs


def test_three_turns_compute_only_new_tokens_and_match_cold_runs():
    counter = StepCounter()
    engine = tiny_engine(num_blocks=128, block_size=4, observer=counter)
    cold_engine = tiny_engine(num_blocks=128, block_size=4)
    try:
        conversation = [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12]
        for turn in range(3):
            conversation = conversation + [100 + turn, 200 + turn, 300 + turn]
            before = counter.tokens
            warm = asyncio.run(run(engine, f"turn{turn}", conversation, tenant="t", session="chat"))
            computed = counter.tokens - before
            usage = warm[-1].usage
            # prompt tokens not served from the cache, plus one step per generated token after the first
            assert computed == (usage.prompt_tokens - usage.cached_tokens) + (usage.completion_tokens - 1)
            if turn:
                assert usage.cached_tokens >= len(conversation) - 3 - 4 and usage.cached_tokens % 4 == 0
            cold = asyncio.run(run(cold_engine, f"cold{turn}", conversation, tenant=f"cold-{turn}"))
            assert cold[-1].usage.cached_tokens == 0
            for w, c in zip([lp for o in warm for lp in o.logprobs], [lp for o in cold for lp in o.logprobs]):
                assert w.token_id == c.token_id
                assert max(abs(a - b) for (_, a), (_, b) in zip(w.top, c.top)) <= 1e-5
            conversation = conversation + [t for o in warm for t in o.token_ids]
            engine.flush_inbox()
            engine.check_integrity()
        assert engine.kv.sessions.num_sessions == 1
    finally:
        engine.stop()
        cold_engine.stop()
