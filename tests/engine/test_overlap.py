"""Overlapped decode steps (server/engine/overlap.py): step N+1 planned and launched while step N runs,
with outputs exactly those of the steps in series."""
from __future__ import annotations

import asyncio
import random
import threading

import pytest

from server.engine.request import GenerationRequest, SamplingParams
from tests.helpers import collect, roomy_and_tight_runs, tiny_engine

rng = random.Random(5)
PROMPTS = [[rng.randrange(3, 200) for _ in range(rng.randrange(2, 30))] for _ in range(10)]


def _params(i: int, **extra) -> SamplingParams:
    """Greedy and seeded sampled requests of different lengths (so that some end while others go on)."""
    sampled = i % 3 == 0
    return SamplingParams(**{"max_tokens": 4 + 3 * i, "temperature": 0.9 if sampled else 0.0, "seed": i,
                             "logprobs": 2, "ignore_eos": True, **extra})


def _summary(result) -> tuple:
    outputs, text, tokens = result
    return (text, tokens, [(lp.token_id, lp.logprob) for o in outputs for lp in o.logprobs],
            outputs[-1].finish_reason)


def assert_same(got: dict, expected: dict) -> None:
    """Same requests, texts, tokens and finish reasons; the chosen tokens' logprobs within float
    rounding (which rows share a batch depends on timing, and a matrix product's rounding on the batch)."""
    assert got.keys() == expected.keys()
    for request_id, want in expected.items():
        have = got[request_id]
        if want is None:
            assert have is None, request_id
            continue
        assert (have[0], have[1], have[3]) == (want[0], want[1], want[3]), request_id
        assert [t for t, _ in have[2]] == [t for t, _ in want[2]], request_id
        assert all(abs(a - b) <= 1e-4 for (_, a), (_, b) in zip(have[2], want[2])), request_id


def _run(overlap: bool, waves, abort_after: dict[str, int] | None = None, **engine_overrides):
    """Run `waves` (lists of (request id, prompt, params)); each wave after the first is sent once the
    first request of the one before has its first token, so it joins a batch already decoding.
    `abort_after[id] = n`: that request's client goes away after n outputs. Returns the summaries by
    id, the engine's pipeline counters, and checks the cache afterwards."""
    engine = tiny_engine(num_blocks=256, overlap_steps=overlap, **engine_overrides)
    abort_after = abort_after or {}
    try:
        async def one(request_id, prompt, params, started: asyncio.Event | None):
            if request_id in abort_after:
                outputs = []
                async for out in engine.generate(GenerationRequest(request_id, prompt, params)):
                    outputs.append(out)
                    if len(outputs) == abort_after[request_id]:
                        break               # the client is gone: the engine aborts it
                return request_id, None
            if started is None:
                return request_id, _summary(await collect(engine, GenerationRequest(request_id, prompt, params)))
            outputs = []
            async for out in engine.generate(GenerationRequest(request_id, prompt, params)):
                outputs.append(out)
                started.set()
            text = "".join(o.text for o in outputs)
            return request_id, _summary((outputs, text, [t for o in outputs for t in o.token_ids]))

        async def all_waves():
            tasks = []
            for wave in waves:
                started = asyncio.Event()
                wave_tasks = [asyncio.create_task(one(rid, prompt, params, started if k == 0 else None))
                              for k, (rid, prompt, params) in enumerate(wave)]
                tasks += wave_tasks
                # on to the next wave at the first token (or if the first request ended without one)
                await asyncio.wait([asyncio.create_task(started.wait()), wave_tasks[0]],
                                   return_when=asyncio.FIRST_COMPLETED)
            return dict(await asyncio.gather(*tasks))

        results = asyncio.run(all_waves())
        engine.flush_inbox()
        engine.check_integrity()
        assert engine.kv.pool.num_used_blocks == 0, "a step in flight left blocks behind"
        pipeline = engine.core.pipeline
        counters = (pipeline.num_launched, pipeline.num_planned_ahead) if pipeline is not None else (0, 0)
        return results, counters
    finally:
        engine.stop()


def test_overlapped_steps_give_exactly_the_outputs_of_steps_in_series():
    first = [(f"a{i}", p, _params(i)) for i, p in enumerate(PROMPTS[:6])]
    serial, _ = _run(False, [first])
    # a stop string and a stop token that end requests mid-run (their next step is already in flight):
    # taken from what the same prompt and parameters gave alone
    stop_text = serial["a3"][0][1:3]
    stop_token = serial["a2"][1][4]
    assert len(stop_text) == 2
    second = [("b0", PROMPTS[3], _params(3, stop=(stop_text,))),
              ("b1", PROMPTS[2], _params(2, stop_token_ids=(stop_token,))),
              ("b2", PROMPTS[8], _params(4, presence_penalty=0.5)),    # not overlappable: the pipeline waits
              ("b3", PROMPTS[9], _params(5))]
    waves = [first, second]
    expected, serial_counters = _run(False, waves)
    got, (launched, planned_ahead) = _run(True, waves)
    assert_same(got, expected)
    assert serial_counters == (0, 0)
    assert got["b0"][3] == "stop" and stop_text not in got["b0"][0]
    assert got["b1"][3] == "stop" and got["b1"][1][-1] == stop_token
    assert planned_ahead > 0 and launched > planned_ahead


def test_aborted_and_preempted_requests_in_flight_leave_nothing_behind():
    wave = [(f"c{i}", p, _params(i)) for i, p in enumerate(PROMPTS[:6])]
    aborts = {"c3": 2, "c5": 4}
    expected, _ = _run(False, [wave], abort_after=aborts)
    got, (_, planned_ahead) = _run(True, [wave], abort_after=aborts)
    assert_same(got, expected)
    assert planned_ahead > 0
    # a cache too small for all of them: requests are preempted and resume, tokens unchanged
    roomy, tight, scheduler = roomy_and_tight_runs([p * 3 for p in PROMPTS[:6]], max_tokens=24, tight_blocks=40,
                                                   overlap_steps=True)
    assert tight == roomy and scheduler.num_preemptions > 0


def test_the_host_plans_the_next_step_while_the_device_runs():
    """A simulated device: each decode forward waits (without the GIL) until the host has launched the
    step after it. Steps in series would never get there; overlapped ones always do, so every
    decode step but the last sees its successor launched while it runs."""
    max_tokens = 8
    seen: list[bool] = []
    engine = tiny_engine(num_blocks=64, overlap_steps=True, start=False)
    runner, pipeline = engine.core.runner, engine.core.pipeline
    real_forward = runner._forward
    launched = threading.Condition()
    original_launch = pipeline._launch

    def launch_and_tell(*args, **kwargs):
        step = original_launch(*args, **kwargs)
        with launched:
            launched.notify_all()
        return step

    def forward(batch):
        # after the prompts' step, every step is one of the pipeline's: decode step j is its launch
        # j + 1, and its successor launch j + 2 (none after the last decode step)
        decode_step = len(seen)
        if batch.positions.min() > 0 and decode_step < max_tokens - 2:
            with launched:
                seen.append(launched.wait_for(lambda: pipeline.num_launched >= decode_step + 2, timeout=30))
        return real_forward(batch)

    pipeline._launch = launch_and_tell
    runner._forward = forward
    engine.start()
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

        async def both():
            return await asyncio.gather(*(collect(engine, GenerationRequest(f"d{i}", [5, 6, 7, 8 + i], params))
                                          for i in range(2)))
        results = asyncio.run(both())
    finally:
        engine.stop()
    assert [len(r[2]) for r in results] == [max_tokens, max_tokens]
    assert seen == [True] * (max_tokens - 2)


def test_a_step_that_fails_in_flight_fails_its_requests_and_the_engine_goes_on():
    engine = tiny_engine(num_blocks=64, overlap_steps=True, start=False)
    runner = engine.core.runner
    real_forward = runner._forward
    calls = []

    def forward(batch):
        calls.append(batch.token_ids.shape[0])
        if len(calls) == 4:
            raise RuntimeError("device fault")
        return real_forward(batch)

    runner._forward = forward
    engine.start()
    try:
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

        async def run(ids):
            return await asyncio.gather(*(collect(engine, GenerationRequest(rid, [5, 6, 7], params)) for rid in ids))
        failed = asyncio.run(run(["e0", "e1"]))
        assert all(r[0][-1].finish_reason == "error" and "device fault" in r[0][-1].error for r in failed)
        after = asyncio.run(run(["e2"]))
        assert after[0][0][-1].finish_reason == "length" and len(after[0][2]) == 10
        engine.flush_inbox()
        engine.check_integrity()
        assert engine.kv.pool.num_used_blocks == 0
    finally:
        engine.stop()


def test_overlap_steps_flag():
    """auto: on with CUDA only; the flag reaches the engine's configuration; a bad value is refused."""
    from server.cli.main import build_parser
    from server.cli.serve import config_from_args, overlap_steps_wanted
    assert overlap_steps_wanted("auto", "cpu") is False
    assert overlap_steps_wanted("on", "cpu") is True and overlap_steps_wanted("off", "cpu") is False
    parse = build_parser().parse_args
    assert config_from_args(parse(["serve", "--overlap-steps", "on"])).engine.overlap_steps is True
    assert config_from_args(parse(["serve"])).engine.overlap_steps is False
    with pytest.raises(ValueError, match="--overlap-steps 'sometimes': choose auto, on or off"):
        config_from_args(parse(["serve", "--overlap-steps", "sometimes"]))


def test_a_batch_built_on_the_host_moves_whole_to_the_device_that_runs_it():
    """The pipeline builds a step's batch on the host and the worker moves it (`PagedBatch.to`): every
    tensor goes, nothing else changes; a batch already there is returned as it is."""
    import dataclasses

    import numpy as np
    import torch

    from model.cache.batch import PagedBatch
    tables = np.array([[3, 4, -1], [7, -1, -1]])
    batch = PagedBatch.decode(np.array([11, 12]), np.array([5, 2]), tables, np.array([True, True]), block_size=4)
    assert batch.to("cpu") is batch
    moved = batch.to("meta")
    for field in dataclasses.fields(PagedBatch):
        before, after = getattr(batch, field.name), getattr(moved, field.name)
        if isinstance(before, torch.Tensor):
            assert after.device.type == "meta" and after.shape == before.shape and after.dtype == before.dtype
        else:
            assert after == before, field.name


def test_bench_engine_runs_overlapped_steps_over_a_simulated_device(tmp_path):
    """`bench engine --overlap-steps --simulated-device-ms 2`: every forward is the simulated wait
    (so its median is at least 2 ms), and the result says how it ran."""
    from model.loading.builtin import builtin_model_path
    from server.cli.bench.engine_bench import bench_engine
    from tests.api_server import make_tiny_checkpoint

    model_dir = make_tiny_checkpoint(tmp_path / "tiny")
    result = bench_engine(str(model_dir), None, str(builtin_model_path()), "cpu", "float32", [3], 8, 8, 0.02,
                          threads=1, overlap_steps=True, simulated_device_ms=2.0)
    assert result["overlap_steps"] is True and result["simulated_device_ms"] == 2.0
    (row,) = result["results"]
    assert row["batch_size"] == 3 and row["steps_measured"] >= 1 and row["median_forward_ms"] >= 2.0
