"""Text made on the API side of an engine-core process (server/engine/front_text.py) is the text the
in-process engine makes: the same deltas joined, finish reasons and usage, with stop strings,
min_tokens, stop_token_ids and ignore_eos, for an engine that sends token ids only."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from server.engine.detokenizer import byte_view
from server.engine.front_text import RequestText
from server.engine.request import GenerationRequest, SamplingParams
from tests.helpers import collect, tiny_engine

PROMPTS = [[72, 101, 108, 108, 111], [195, 169, 32, 97], [1, 2, 3, 4, 5, 6, 7, 8]]


@pytest.fixture(scope="module")
def engines():
    with_text, ids_only = tiny_engine(), tiny_engine(detokenize=False)
    yield with_text, ids_only
    with_text.stop()
    ids_only.stop()


async def ids_only_run(engine, request: GenerationRequest):
    """What the API process in front of an engine-core process gets for `request`: the core is sent
    the request without its stop strings and its token ids become text here."""
    text = RequestText(engine.tokenizer, byte_view(engine.tokenizer), request, engine.core.eos_token_ids)
    sent = dataclasses.replace(request, params=dataclasses.replace(request.params, stop=()))
    outputs = []
    async for output in engine.generate(sent):
        outputs.append(text.apply(output))
        if outputs[-1].finished:
            break
    return outputs


def cases(plain_texts: list[str]) -> list[tuple[list[int], SamplingParams]]:
    found = []
    for prompt, text in zip(PROMPTS, plain_texts):
        middle = text[len(text) // 2: len(text) // 2 + 2] or "x"
        found += [(prompt, SamplingParams(max_tokens=20, temperature=0)),
                  (prompt, SamplingParams(max_tokens=20, temperature=0, stop=(middle,))),
                  (prompt, SamplingParams(max_tokens=20, temperature=0, stop=(text[:1] or "x", "never"))),
                  (prompt, SamplingParams(max_tokens=20, temperature=0.9, seed=5, stop=(middle[:1] or "x",))),
                  (prompt, SamplingParams(max_tokens=20, temperature=0, min_tokens=6, stop_token_ids=(prompt[-1],))),
                  (prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2,
                                          stop=(middle,)))]
    return found


def test_text_finish_reasons_and_usage_match_the_in_process_engine(engines):
    with_text, ids_only = engines

    async def run():
        plain = [(await collect(with_text, GenerationRequest(f"p{i}", p, SamplingParams(max_tokens=20, temperature=0))))[1]
                 for i, p in enumerate(PROMPTS)]
        compared = 0
        for i, (prompt, params) in enumerate(cases(plain)):
            expected, expected_text, expected_tokens = await collect(with_text, GenerationRequest(f"a{i}", prompt, params))
            got = await ids_only_run(ids_only, GenerationRequest(f"b{i}", prompt, params))
            assert "".join(o.text for o in got) == expected_text, (params, expected_text)
            assert [t for o in got for t in o.token_ids] == expected_tokens
            assert got[-1].finish_reason == expected[-1].finish_reason
            usage, expected_usage = got[-1].usage, expected[-1].usage    # (cached tokens: the core's, over the wire)
            assert (usage.prompt_tokens, usage.completion_tokens) == (expected_usage.prompt_tokens,
                                                                     expected_usage.completion_tokens)
            if params.logprobs is not None:
                assert [lp for o in got for lp in o.logprobs] == [lp for o in expected for lp in o.logprobs]
            compared += expected[-1].finish_reason == "stop"
        return compared

    assert asyncio.run(run()) >= 3          # stop strings and ending tokens did end some of them
    for engine in engines:
        engine.flush_inbox()
        engine.check_integrity()
