"""The engine end to end on a tiny model: exact greedy decoding, batch invariance, stops, failures,
and a randomised run of 200 requests with aborts."""
from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from model.config import preset
from server.engine.errors import EngineDeadError
from server.engine.request import GenerationRequest, SamplingParams
from tests.helpers import collect, roomy_and_tight_runs, tiny_engine
from tests.oracles.custom_llm_oracle import oracle_logits

CFG = preset("custom-llm-tiny")


@pytest.fixture(scope="module")
def engine():
    engine = tiny_engine()
    yield engine
    engine.stop()


def request(rid, prompt, **params):
    return GenerationRequest(rid, prompt, SamplingParams(**params))


def test_greedy_decoding_follows_the_oracle(engine):
    prompt = [5, 77, 300, 12, 9, 41, 200]
    outputs, _, tokens = asyncio.run(collect(engine, request("g", prompt, max_tokens=12, temperature=0,
                                                             ignore_eos=True)))
    sd = engine.model.state_dict()
    seq = list(prompt)
    for token in tokens:
        assert token == int(oracle_logits(sd, CFG, seq)[-1].argmax())
        seq.append(token)
    assert outputs[-1].finish_reason == "length"
    assert outputs[-1].usage.completion_tokens == 12 and outputs[-1].usage.prompt_tokens == 7
    engine.flush_inbox()
    engine.check_integrity()


def test_logits_and_seeded_samples_are_batch_invariant(engine):
    prompt = [3, 4, 5, 6, 7, 8, 9, 10, 11]
    target = dict(max_tokens=8, temperature=0.9, top_p=0.95, seed=1234, logprobs=20, ignore_eos=True)

    async def alone():
        return await collect(engine, request("alone", prompt, **target))

    async def batched():
        rng = random.Random(0)
        others = [collect(engine, request(f"o{i}", [rng.randrange(1, 500) for _ in range(rng.randrange(2, 30))],
                                          max_tokens=rng.randrange(4, 12), temperature=rng.random(),
                                          top_k=rng.randrange(0, 50), ignore_eos=True))
                  for i in range(15)]
        results = await asyncio.gather(*others[:7], collect(engine, request("batched", prompt, **target)),
                                       *others[7:])
        return results[7]

    out_alone, _, tokens_alone = asyncio.run(alone())
    out_batched, _, tokens_batched = asyncio.run(batched())
    assert tokens_alone == tokens_batched
    for a, b in zip([lp for o in out_alone for lp in o.logprobs], [lp for o in out_batched for lp in o.logprobs]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) <= 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) <= 1e-4
    engine.flush_inbox()
    engine.check_integrity()


def test_streamed_text_never_breaks_a_multibyte_character(engine):
    """Tokens are single bytes here, so every multi-byte character spans tokens. Random bytes also
    form invalid sequences (decoded as U+FFFD wherever they stand); what must never happen is a delta
    that ends inside a character that a later token completes: the deltas must add up to the
    decoded output."""
    outputs, text, tokens = asyncio.run(collect(engine, request("mb", [1, 2, 3], max_tokens=60, temperature=1.5,
                                                                seed=5, ignore_eos=True)))
    assert any(t >= 0x80 for t in tokens if t < 256)
    assert text == engine.tokenizer.decode(tokens)
    completed = [o for o in outputs[:-1] if o.text]
    assert completed and all(not o.text.endswith("\ufffd") for o in completed)


def test_stop_string_is_not_returned(engine):
    # find what greedy decoding produces, then stop on a piece of it that spans tokens
    _, text, tokens = asyncio.run(collect(engine, request("free", [65, 66, 67], max_tokens=20, temperature=0,
                                                          ignore_eos=True)))
    if len(text) < 4:
        pytest.skip("greedy output too short to cut a stop string from")
    stop = text[2:4]
    outputs, stopped_text, _ = asyncio.run(collect(engine, request("stop", [65, 66, 67], max_tokens=20, temperature=0,
                                                                   ignore_eos=True, stop=(stop,))))
    assert outputs[-1].finish_reason == "stop"
    assert stopped_text == text[: text.index(stop)]


def test_min_tokens_holds_back_eos_and_stop_token_ids(engine):
    """The byte tokenizer's eos is 0: with a +100 bias on it greedy ends at once, unless min_tokens
    masks it (and a request's stop_token_ids) until that many tokens came."""
    eos_first = dict(temperature=0, max_tokens=8, logit_bias=((0, 100.0),))
    outputs, _, tokens = asyncio.run(collect(engine, request("eos", [65, 66], **eos_first)))
    assert tokens == [0] and outputs[-1].finish_reason == "stop"
    outputs, _, tokens = asyncio.run(collect(engine, request("min", [65, 66], min_tokens=5, **eos_first)))
    assert len(tokens) == 6 and 0 not in tokens[:5] and tokens[5] == 0
    assert outputs[-1].finish_reason == "stop" and outputs[-1].usage.completion_tokens == 6
    stop_first = dict(temperature=0, max_tokens=8, logit_bias=((7, 100.0),), stop_token_ids=(7,), ignore_eos=True)
    _, _, tokens = asyncio.run(collect(engine, request("stop-id", [65, 66], **stop_first)))
    assert tokens == [7]
    outputs, _, tokens = asyncio.run(collect(engine, request("min-stop-id", [65, 66], min_tokens=3, **stop_first)))
    assert len(tokens) == 4 and 7 not in tokens[:3] and outputs[-1].finish_reason == "stop"
    engine.flush_inbox()
    engine.check_integrity()


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    original = engine.core.runner.execute
    calls = {"n": 0}

    def flaky(chunks):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return original(chunks)

    monkeypatch.setattr(engine.core.runner, "execute", flaky)
    outputs, _, _ = asyncio.run(collect(engine, request("fail", [1, 2, 3], max_tokens=4)))
    assert outputs[-1].finish_reason == "error" and "injected failure" in outputs[-1].error
    outputs, _, tokens = asyncio.run(collect(engine, request("after", [1, 2, 3], max_tokens=4, ignore_eos=True)))
    assert outputs[-1].finish_reason == "length" and len(tokens) == 4
    assert engine.alive
    engine.flush_inbox()
    engine.check_integrity()


def test_the_loop_in_the_calling_thread_serves_a_client_thread_and_stops_at_once():
    """As `customllm serve` and `bench engine` run it: the loop in this thread, the client in another
    that may start first; its `stop()` returns when the loop has ended (this thread goes on)."""
    engine = tiny_engine(start=False)
    assert not engine.alive and not engine.wait_started(timeout=0)
    finished = []

    def client() -> None:
        assert engine.wait_started(timeout=60)
        outputs, _, tokens = asyncio.run(collect(engine, request("c", [1, 2, 3], max_tokens=4, ignore_eos=True)))
        finished.append((outputs[-1].finish_reason, len(tokens)))
        engine.stop()

    thread = threading.Thread(target=client)
    thread.start()
    engine.run_forever()
    thread.join(timeout=10)          # stop() waited for the loop, not for this thread to end
    assert not thread.is_alive() and finished == [("length", 4)]
    assert not engine.alive
    with pytest.raises(EngineDeadError):
        engine.submit(request("late", [1], max_tokens=1), lambda output: None)


def test_invalid_requests_are_rejected_before_queueing(engine):
    async def first(req):
        async for out in engine.generate(req):
            return out
    with pytest.raises(ValueError, match="maximum context length"):
        asyncio.run(first(request("long", [1] * 200, max_tokens=100)))
    with pytest.raises(ValueError, match="top_p"):
        asyncio.run(first(request("bad", [1], top_p=0)))
    with pytest.raises(ValueError, match="at least one token"):
        asyncio.run(first(request("empty", [])))


def test_preemption_keeps_outputs_exact():
    """With a cache too small for all requests at once, preempted requests resume and produce
    the same greedy tokens as with a roomy cache."""
    prompts = [[(7 * i + j) % 400 + 1 for j in range(10 + 3 * i)] for i in range(6)]
    expected, got, tight = roomy_and_tight_runs(prompts, max_tokens=16, tight_blocks=24)
    assert tight.num_preemptions > 0
    assert got == expected


def test_200_random_requests_with_aborts_all_finish():
    engine = tiny_engine(num_blocks=48, max_num_batched_tokens=64, max_num_seqs=16)
    rng = random.Random(42)

    async def one(i):
        params = dict(max_tokens=rng.randrange(1, 24), temperature=rng.choice([0, 0.7, 1.2]),
                      top_k=rng.choice([0, 5, 40]), top_p=rng.choice([1.0, 0.9]), min_p=rng.choice([0, 0.05]),
                      repetition_penalty=rng.choice([1.0, 1.2]), presence_penalty=rng.choice([0, 0.5]),
                      frequency_penalty=rng.choice([0, 0.3]), seed=rng.choice([None, i]),
                      stop=rng.choice([(), ("a",), ("zz", "q")]))
        prompt = [rng.randrange(1, 500) for _ in range(rng.randrange(1, 60))]
        abort_after = rng.choice([None, None, 0, 1, 3])
        gen = engine.generate(request(f"r{i}", prompt, **params))
        count, last = 0, None
        async for out in gen:
            last = out
            count += 1
            if abort_after is not None and count > abort_after:
                await gen.aclose()
                return "aborted"
        assert last.finished and last.usage is not None
        return last.finish_reason

    async def main():
        return await asyncio.gather(*(one(i) for i in range(200)))

    try:
        reasons = asyncio.run(main())
        assert len(reasons) == 200 and set(reasons) <= {"stop", "length", "aborted", "abort"}
        engine.flush_inbox()
        engine.check_integrity()
        assert engine.kv.pool.num_used_blocks == 0 and engine.num_requests == 0
    finally:
        engine.stop()


def test_mixed_precision_uses_the_small_step_model_for_decode_steps():
    """`--dtype mixed`: steps of one or two tokens run the float16 copy, bigger ones the bfloat16 model,
    over one bfloat16 cache; greedy output stays close to float32's."""
    import copy

    from server.executor.runner import ModelRunner
    from tests.helpers import make_cache, perturbed_model
    model = perturbed_model(CFG, seed=11, std=0.15).to(torch.bfloat16)
    small = copy.deepcopy(model).to(torch.float16)
    calls = []
    for name, m in (("bf16", model), ("fp16", small)):
        original = m.forward_paged
        m.forward_paged = lambda batch, cache, _o=original, _n=name: (calls.append((_n, batch.token_ids.shape[0])),
                                                                      _o(batch, cache))[1]
    runner = ModelRunner(model, make_cache(CFG, dtype=torch.bfloat16), torch.device("cpu"), small_step_model=small)
    from server.engine.scheduler import ScheduledChunk
    from server.engine.sequence import Sequence
    seq = Sequence(request("m", list(range(1, 9))), emit=lambda out: None)
    seq.blocks.block_ids = [0, 1, 2]
    runner.execute([ScheduledChunk(seq, 0, 8).sequence_chunk(runner.cache.block_size)])
    seq.output_token_ids.append(5)
    runner.execute([ScheduledChunk(seq, 8, 1).sequence_chunk(runner.cache.block_size)])
    assert calls == [("bf16", 8), ("fp16", 1)]
