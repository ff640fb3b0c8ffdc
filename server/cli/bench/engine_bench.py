"""`customllm bench engine`: offline decode throughput per batch size, against the memory floor.

For each batch size B: B requests with `--context-len` prompt tokens decode `--output-len` tokens
greedily through the real engine (scheduler, runner, sampler). Decode tokens/s comes from the
duration of the pure-decode steps (B tokens each). Each step must move the weights it touches plus
the cache rows it reads; divided by the machine's measured copy bandwidth that gives the floor.

With `--json-schema FILE` every batch size runs twice in the same sitting, unconstrained and with
every row constrained by the schema (the grammar mask in the sampler, the grammar state advancing
per token): the cost of structured outputs. The schema should produce answers longer than
`--output-len` (e.g. an array with `minItems`), or rows finish early and fewer steps are measured.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import statistics
import threading
import time

import torch

from server.cli.bench.memory import cache_bytes_read, measure_copy_bandwidth, weight_bytes_touched
from server.config import EngineConfig, ModelLoadConfig, ServerConfig
from server.executor.build import build_engine, freeze_loaded_objects
from server.engine.results import NullObserver
from server.engine.request import GenerationRequest, SamplingParams

log = logging.getLogger("customllm.bench")


class StepTimer(NullObserver):
    """Records (end time, tokens, forward seconds) of every engine step; `forward_seconds` reads the
    runner's time of the step's forward (set once the engine exists)."""

    def __init__(self):
        self.steps: list[tuple[float, int, float]] = []
        self.lock = threading.Lock()
        self.forward_seconds = lambda: 0.0

    def on_step(self, num_scheduled_tokens: int, shared: bool = False) -> None:
        with self.lock:
            self.steps.append((time.perf_counter(), num_scheduled_tokens, self.forward_seconds()))

    def take(self) -> list[tuple[float, int, float]]:
        with self.lock:
            steps, self.steps = self.steps, []
        return steps


def decode_step_seconds(steps: list[tuple[float, int, float]], batch_size: int) -> list[tuple[float, float]]:
    """(duration, forward seconds) of steps that decoded exactly `batch_size` tokens right after
    another such step."""
    return [(t1 - t0, f1) for (t0, n0, _), (t1, n1, f1) in zip(steps, steps[1:])
            if n0 == batch_size and n1 == batch_size]


async def _run_batch(engine, batch_size: int, context_len: int, output_len: int, seed: int,
                     grammar=None) -> None:
    rng = random.Random(seed)
    vocab = engine.vocab_size
    tag = "json" if grammar is not None else "plain"

    async def one(i: int) -> None:
        prompt = [rng.randrange(3, vocab) for _ in range(context_len)]
        request = GenerationRequest(f"bench-{tag}-{batch_size}-{i}", prompt, SamplingParams(
            max_tokens=output_len, temperature=0.0, ignore_eos=True, grammar=grammar))
        async for _ in engine.generate(request):
            pass

    await asyncio.gather(*(one(i) for i in range(batch_size)))


def bench_engine(model: str | None, preset: str | None, tokenizer: str | None, device: str, dtype: str,
                 batch_sizes: list[int], context_len: int, output_len: int, kv_cache_gib: float | None,
                 threads: int | None = None, prefill_lens: list[int] = (), json_schema: str | None = None,
                 quantization: str = "auto", compile_decode: bool = False, decode_attention: str = "auto",
                 kv_cache_dtype: str = "auto",
                 max_num_batched_tokens: int | None = None, detokenize: bool = True, overlap_steps: bool = False,
                 simulated_device_ms: float | None = None, adaptive_threads: bool = False,
                 freeze_loaded: bool = False) -> dict:
    """`max_num_batched_tokens` (default: 2048, or one whole prompt) bounds each step's prefill: the
    running rows decode while later prompts are filled in, so a batch decodes together only for the
    tokens left once every prompt is in; many long prompts need a larger budget. `detokenize` False:
    the engine's work as in `serve`'s engine-core process, whose API process makes the text.
    `overlap_steps`: as `serve --overlap-steps on`. `simulated_device_ms`: every forward is a wait of
    that long that leaves the host free (`ModelRunner.simulate_device`), so a step costs the host's
    work plus that wait in series, or about the larger of the two with `overlap_steps`.
    `freeze_loaded`: as `serve` does once loaded (`freeze_loaded_objects`); the command line's run."""
    from server.executor.threads import configure_threads
    configure_threads(threads)
    timer = StepTimer()
    max_batch = max(batch_sizes)
    engine_config = EngineConfig(max_num_seqs=max_batch,
                                 max_num_batched_tokens=max_num_batched_tokens or max(2048, context_len),
                                 kv_cache_memory_gib=kv_cache_gib, max_waiting_requests=max_batch * 2,
                                 detokenize=detokenize, overlap_steps=overlap_steps,
                                 adaptive_threads=adaptive_threads)
    engine = build_engine(ServerConfig(model=ModelLoadConfig(model=model, preset=preset, tokenizer=tokenizer,
                                                             device=device, dtype=dtype,
                                                             quantization=quantization,
                                                             compile_decode=compile_decode,
                                                             decode_attention=decode_attention,
                                                             kv_cache_dtype=kv_cache_dtype),
                                       engine=engine_config), observer=timer, start=False)
    if freeze_loaded:
        freeze_loaded_objects()
    engine.core.runner.time_forward = True
    if simulated_device_ms is not None:
        engine.core.runner.simulate_device(simulated_device_ms / 1e3)
    timer.forward_seconds = lambda: engine.core.runner.last_forward_s
    result: dict = {}
    # measured here, in the thread that runs the model: an OpenMP team started from another thread
    # keeps spinning on the cores for a while and would slow the engine down
    bandwidth = measure_copy_bandwidth(engine.device)
    log.info("measured copy bandwidth: %.1f GB/s", bandwidth / 1e9)

    def drive() -> None:
        grammar = None
        if json_schema is not None:
            from server.api.structured import json_spec
            started = time.perf_counter()
            grammar = engine.grammars.compile(json_spec(json.loads(json_schema)))
            log.info("schema compiled in %.1f ms (vocabulary view included)", (time.perf_counter() - started) * 1e3)
        result.update(_measure(engine, timer, batch_sizes, context_len, output_len, bandwidth, grammar))
        # with overlapped steps "host" is the host time a step still pays: what the forward did not hide
        result.update(overlap_steps=overlap_steps, simulated_device_ms=simulated_device_ms)
        if engine.core.threads is not None:
            result.update(adaptive_threads=True, thread_changes=engine.core.threads.num_changes,
                          threads_at_end=engine.core.threads.threads)
        result["prefill"] = time_to_first_tokens(engine, prefill_lens)

    drive_engine(engine, drive)
    return result


def drive_engine(engine, work) -> None:
    """Run `work()` in a client thread while the engine loop runs in this one (the main thread, see
    Engine.run_forever); the engine stops when `work` ends, and what `work` raised is raised here."""
    errors: list[BaseException] = []

    def client() -> None:
        try:
            if not engine.wait_started(timeout=60):
                raise RuntimeError("the engine loop did not start")
            work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
        finally:
            engine.stop()

    driver = threading.Thread(target=client, name="bench-driver", daemon=True)
    driver.start()
    engine.run_forever()
    driver.join()
    if errors:
        raise errors[0]


def time_to_first_tokens(engine, prompt_lens) -> list[dict]:
    """`_time_to_first_token` for each length in turn, each prompt seeded apart: a length listed
    twice is a new prompt, not a hit in the prefix cache."""
    return [_time_to_first_token(engine, length, seed=1_000_003 * (i + 1) + length)
            for i, length in enumerate(prompt_lens)]


def _time_to_first_token(engine, prompt_len: int, seed: int) -> dict:
    """One request of `prompt_len` random tokens (seeded by `seed`; no prefix cached) generating one
    token, alone."""
    log.info("prefill: one prompt of %d tokens", prompt_len)
    started = time.perf_counter()
    asyncio.run(_run_batch(engine, 1, prompt_len, 1, seed=seed))
    seconds = time.perf_counter() - started
    log.info("prefill: %d tokens, first token after %.0f ms (%.0f prompt tok/s)", prompt_len, seconds * 1e3,
             prompt_len / seconds)
    return {"prompt_tokens": prompt_len, "time_to_first_token_ms": seconds * 1e3,
            "prefill_tokens_per_s": prompt_len / seconds}


def _measure(engine, timer: StepTimer, batch_sizes: list[int], context_len: int, output_len: int,
             bandwidth: float, grammar=None) -> dict:
    """Per batch size: the median decode step. With a grammar, unconstrained and constrained runs
    alternate plain, json, json, plain (drift in the machine's load cancels out) and each mode's
    steps are pooled."""
    torch_device = engine.device
    cache_dtype_bytes = engine.cache.layers[0].element_size()
    rows = []
    order = (False, True, True, False) if grammar else (False,)
    for batch_size in batch_sizes:
        pooled: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        walls: dict[bool, float] = {False: 0.0, True: 0.0}
        for run, constrained in enumerate(order):
            log.info("batch %d%s: %d prompt tokens, %d new tokens each", batch_size,
                     " (json schema)" if constrained else "", context_len, output_len)
            timer.take()
            started = time.perf_counter()
            asyncio.run(_run_batch(engine, batch_size, context_len, output_len, seed=batch_size * 10 + run,
                                   grammar=grammar if constrained else None))
            walls[constrained] += time.perf_counter() - started
            pooled[constrained] += decode_step_seconds(timer.take(), batch_size)
        for constrained in sorted(set(order)):
            rows.append(_row(engine, batch_size, constrained, pooled[constrained], walls[constrained], context_len,
                             output_len, bandwidth, cache_dtype_bytes))
    from model.layers.kernel_choice import describe_formats
    return {"model": engine.model_name, "device": str(torch_device),
            "dtype": str(engine.cache.dtype).removeprefix("torch."), "weights": describe_formats(engine.model),
            "context_len": context_len,
            "output_len": output_len, "threads": torch.get_num_threads(),
            "copy_bandwidth_gb_s": bandwidth / 1e9, "results": rows}


def _row(engine, batch_size: int, constrained: bool, timed: list[tuple[float, float]], wall: float,
         context_len: int, output_len: int, bandwidth: float, cache_dtype_bytes: int) -> dict:
    if not timed:
        raise ValueError(f"batch {batch_size}: no pure decode steps measured; raise --output-len "
                         "or --kv-cache-memory (or use a schema with longer answers)")
    durations = [d for d, _ in timed]
    step = statistics.median(durations)
    forward = statistics.median(f for _, f in timed)
    host = statistics.median(d - f for d, f in timed)
    mean_context = context_len + output_len // 2
    bytes_per_step = (weight_bytes_touched(engine.model, batch_size)
                      + cache_bytes_read(engine.model_config, batch_size, mean_context, cache_dtype_bytes))
    floor_step = bytes_per_step / bandwidth
    row = {
        "batch_size": batch_size, "json_schema": constrained, "decode_tokens_per_s": batch_size / step,
        "median_step_ms": step * 1e3, "median_forward_ms": forward * 1e3, "median_host_ms": host * 1e3,
        "host_us_per_seq": host * 1e6 / batch_size, "steps_measured": len(durations), "wall_s": wall,
        "bytes_per_step": bytes_per_step, "floor_step_ms": floor_step * 1e3,
        "fraction_of_bandwidth_floor": floor_step / step,
    }
    log.info("batch %d%s: %.1f tok/s, step %.2f ms (forward %.2f ms, host %.2f ms = %.1f us per sequence; "
             "floor %.2f ms, %.0f%% of bandwidth)", batch_size, " (json schema)" if constrained else "",
             batch_size / step, step * 1e3, forward * 1e3, host * 1e3, host * 1e6 / batch_size,
             floor_step * 1e3, 100 * floor_step / step)
    return row

