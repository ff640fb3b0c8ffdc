"""Sampling never turns a bad row into a token, and one request's bad row never fails its batch
neighbours: tiny positive temperatures are greedy, a row of NaN (or no finite logit) ends that
request with an error, and a row whose sampling raises is isolated from the rest of the batch."""
from __future__ import annotations

import asyncio

import torch

from server.engine.request import GREEDY_BELOW_TEMPERATURE, GenerationRequest, SamplingParams
from server.engine.sampler import NO_TOKEN, Sampler, SamplingRow, row_argmax, rows_with_nan
from tests.helpers import collect, tiny_engine

V = 16


def row(**params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), [1, 2], [3])


def test_a_tiny_positive_temperature_is_greedy():
    logits = torch.randn(3, V)
    rows = [row(temperature=3.7e-171, presence_penalty=-1.8), row(temperature=GREEDY_BELOW_TEMPERATURE / 2),
            row(temperature=0.0)]
    assert all(r.params.greedy for r in rows)
    penalised = logits.clone()
    penalised[0, 3] += 1.8                                      # presence -1.8 on the output token 3
    out = Sampler()(logits, rows)
    assert out.token_ids == penalised.argmax(-1).tolist()


def test_rows_without_a_finite_logit_get_no_token_and_the_others_are_untouched():
    logits = torch.randn(4, V)
    logits[1, 5] = float("nan")
    logits[2] = float("-inf")
    rows = [row(temperature=0.0), row(temperature=0.8, seed=1), row(temperature=0.8), row(temperature=0.0, logprobs=2)]
    out = Sampler()(logits, rows)
    assert out.token_ids[1] == NO_TOKEN and out.token_ids[2] == NO_TOKEN
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[3] == int(logits[3].argmax())
    assert out.logprobs[3] is not None and out.logprobs[3].token_id == out.token_ids[3]
    for method in Sampler.METHODS:
        for _ in range(20):
            tokens = Sampler(method=method)(logits, rows).token_ids
            assert all(t == NO_TOKEN or 0 <= t < V for t in tokens)


def test_an_all_greedy_batch_finds_bad_rows_through_the_chosen_logit():
    """Greedy rows only: the argmax takes a NaN for the largest value, so checking the chosen logit
    (no pass for the row maximum) still gives NO_TOKEN to a row with a NaN anywhere, a row without a
    finite logit and a row whose largest is +inf, on numpy's float32 path and torch's (float64)."""
    for dtype in (torch.float32, torch.float64):
        logits = torch.randn(5, V, dtype=dtype)
        logits[1, V - 1] = float("nan")                     # after the row's true maximum
        logits[2] = float("-inf")
        logits[3, 7] = float("inf")
        logits[4, :3] = float("nan")
        out = Sampler()(logits, [row(temperature=0.0) for _ in range(5)])
        assert out.token_ids == [int(logits[0].argmax()), NO_TOKEN, NO_TOKEN, NO_TOKEN, NO_TOKEN]


def test_a_bad_row_fails_its_request_alone():
    engine = tiny_engine()
    try:
        execute = engine.core.runner.execute

        def with_a_nan_row(chunks):
            logits = execute(chunks).clone()                                       # [N, V]
            for i, chunk in enumerate(c for c in chunks if c.needs_logits):
                if chunk.token_ids[:1] == [99]:
                    logits[i] = float("nan")
            return logits
        engine.core.runner.execute = with_a_nan_row
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

        async def both():
            return await asyncio.gather(collect(engine, GenerationRequest("bad", [99, 4, 5], params)),
                                        collect(engine, GenerationRequest("good", [7, 4, 5], params)))
        (bad, _, bad_tokens), (good, _, good_tokens) = asyncio.run(both())
        assert bad[-1].finish_reason == "error" and "no finite value" in bad[-1].error and not bad_tokens
        assert good[-1].finish_reason == "length" and len(good_tokens) == 6
        engine.flush_inbox()
        engine.check_integrity()
    finally:
        engine.stop()


def test_a_row_whose_sampling_raises_fails_alone():
    engine = tiny_engine()
    try:
        sampler = engine.core.sampler
        original = sampler.__call__

        class Breaking(type(sampler)):
            def __call__(self, logits, rows):
                if any(r.params.top_k == 3 for r in rows):
                    raise RuntimeError("broken by this row's parameters")
                return original(logits, rows)
        engine.core.sampler = Breaking()

        async def both():
            return await asyncio.gather(
                collect(engine, GenerationRequest("bad", [9, 4, 5], SamplingParams(max_tokens=4, top_k=3))),
                collect(engine, GenerationRequest("good", [7, 4, 5], SamplingParams(max_tokens=4, temperature=0.0,
                                                                                   ignore_eos=True))))
        (bad, _, _), (good, _, good_tokens) = asyncio.run(both())
        assert bad[-1].finish_reason == "error" and "broken by this row" in bad[-1].error
        assert good[-1].finish_reason == "length" and len(good_tokens) == 4
        assert engine.alive
    finally:
        engine.stop()


def test_the_cpu_argmax_and_nan_test_agree_with_torch():
    """row_argmax (numpy's argmax on the CPU) takes the first maximum as torch's argmax does, and
    rows_with_nan (NaN through the row maximum) finds the rows torch's isnan().any() finds: ties,
    infinities, masked rows and NaN anywhere, over small and vectorised row lengths."""
    generator = torch.Generator().manual_seed(4)
    for vocab in (3, 17, 64, 515, 4099):
        for trial in range(40):
            logits = torch.randn(6, vocab, generator=generator).round(decimals=1)      # many ties
            logits[torch.rand(6, vocab, generator=generator) < 0.3] = float("-inf")
            if trial % 3 == 0:
                logits[torch.rand(6, vocab, generator=generator) < 0.02] = float("inf")
            logits[5] = float("-inf")
            nan_rows = torch.rand(6, generator=generator) < 0.4
            columns = torch.randint(0, vocab, (6,), generator=generator)
            logits[nan_rows.nonzero()[:, 0], columns[nan_rows]] = float("nan")
            assert torch.equal(rows_with_nan(logits), torch.isnan(logits).any(-1))
            clean = ~nan_rows
            assert torch.equal(row_argmax(logits)[clean], logits.argmax(-1)[clean])
            assert row_argmax(logits).dtype == torch.int64
