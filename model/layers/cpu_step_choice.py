"""Whether a family's one-call CPU decode step (model/layers/cpu_decode_step.py) serves a row-count
tier, chosen by timing whole decode steps.

The kernel choice (model/layers/kernel_choice.py) times each product alone, its weight hot in the
cache. What it cannot see is what a step in one call saves: ~60 PyTorch ops per layer and the Python
between them. On an Intel Xeon with AMX it held the built-in model's smaller projections in float32
and bfloat16 (alone up to 1.5× faster than integer-dot), which kept the C step out: 64 tok/s at
batch 1 where the step in one call over integer-dot weights gave 140, and 389 against 588 at 16
(docs/benchmarks.md). So where the step needs decode tiers moved to integer-dot, whole decode steps
are timed both ways, at 1 and at 16 rows (the tiers' rows in kernel_choice.ROWS) over a scratch
cache of CONTEXT tokens a row: layer by layer in the chosen formats, then in one call; a tier whose
step is slower in one call goes back to the formats the kernel choice gives its (now maybe joined)
projections. The timings are cached with the kernel timings, by model shape and chosen formats.

On a CPU with AMX tiles a step's batch tier may also multiply its int4 weights by int8-dot copies
(`CpuDecodeStep.use_batch_copies`: whole rows summed in the tiles, no per-group scaling): whole
16-row steps are timed in one call with and without them, and the copies stay where faster.
"""
from __future__ import annotations

import hashlib
import logging
import statistics
import time

import torch

from model.cache.batch import PagedBatch, SequenceChunk
from model.cache.kv_cache import KVCache
from model.layers import integer_dot
from model.layers.cpu_decode_step import TIERS, batch_copy_applies, with_names
from model.layers.kernel_choice import ROWS, Timings, describe_formats, tier_format
from model.layers.quantized_linear import replace_module

log = logging.getLogger("customllm.kernels")

STEP_ROWS = ROWS[:len(TIERS)]       # a tier's step is timed at the rows its products are: 1 and 16
CONTEXT = 128                       # tokens each row has in the cache
BLOCK = 16
WARMUP, RUNS = 2, 5                 # steps run before timing, steps timed (the median counts)


def time_decode_step(model, rows: int, cache_dtype: torch.dtype = torch.float32) -> float:
    """Median seconds of a decode step of `rows` sequences of CONTEXT tokens each, through
    `model.forward_paged` as the runner calls it (a scratch cache of `cache_dtype`; each row its own
    token, so that a mixture of experts routes rows apart as real ones do)."""
    blocks_each = -(-(CONTEXT + WARMUP + RUNS) // BLOCK)
    cache = KVCache(model.config, rows * blocks_each, BLOCK, cache_dtype)
    tables = [list(range(i * blocks_each, (i + 1) * blocks_each)) for i in range(rows)]
    seconds, vocab = [], model.config.vocab_size
    with torch.inference_mode():
        for step in range(WARMUP + RUNS):
            chunks = [SequenceChunk([(row * 7919 + step * 104729 + 1) % vocab], CONTEXT + step, table)
                      for row, table in enumerate(tables)]
            batch = PagedBatch.build(chunks, BLOCK, with_gather=False)
            started = time.perf_counter()
            model.forward_paged(batch, cache.layers)
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[WARMUP:])


def step_key(model, cache_dtype: torch.dtype = torch.float32) -> str:
    """What step timings are valid for: the model's class, config and formats, the cache's dtype
    (the machine is Timings' own key)."""
    digest = hashlib.blake2b(f"{model.config!r}|{describe_formats(model)}|{cache_dtype}".encode(),
                             digest_size=8).hexdigest()
    return f"decode step:{type(model).__name__}:{digest}"


class StepChoice:
    """Both timings of one model's decode steps and the choice between them: `time_layers()` while
    the formats are the kernel choice's, then `time_one_call_and_choose(step, linears_of)` once the
    step is built over integer-dot formats."""

    def __init__(self, model, mode: str, timings: Timings, cache_dtype: torch.dtype = torch.float32):
        self.model, self.mode, self.timings, self.cache_dtype = model, mode, timings, cache_dtype
        self.key = step_key(model, cache_dtype)
        self.layers_s: list[float] = []
        self.measured = False

    def _timed(self, name: str) -> list[float]:
        def measure():
            self.measured = True
            return [time_decode_step(self.model, rows, self.cache_dtype) for rows in STEP_ROWS]
        return self.timings.measured(self.key, name, len(STEP_ROWS), measure)

    def time_layers(self) -> None:
        self.layers_s = self._timed("layer by layer")

    def time_one_call_and_choose(self, step, linears_of) -> None:
        """Tiers whose steps are slower in one call go back to the kernel choice's formats and to
        the layers; `step.tiers` is rebuilt over the formats that stay."""
        one_call_s = self._timed("one call")
        self.timings.save()
        slower = [index for index, rows in enumerate(TIERS)
                  if step.tiers[rows] is not None and one_call_s[index] > self.layers_s[index]]
        for name, linear in with_names(self.model, list(linears_of(self.model))):
            formats = [linear.small_format, linear.large_format, linear.prefill_format]
            for index in slower:
                formats[index] = tier_format(linear, index, self.mode, self.timings)
            if tuple(formats) != (linear.small_format, linear.large_format, linear.prefill_format):
                replace_module(self.model, name, linear.with_formats(*formats))
        step.rebuild(off=[TIERS[index] for index in slower])      # and forget the scratch cache
        timed = " / ".join(str(rows) for rows in STEP_ROWS)
        log.info("decode steps at %s rows (%s): layer by layer %s ms, in one call %s ms: %s", timed,
                 "measured" if self.measured else "cached", _ms(self.layers_s), _ms(one_call_s),
                 f"one call for {step.tier_names()}" if step.usable else "layer by layer")


def _ms(seconds: list[float]) -> str:
    return " / ".join(f"{s * 1e3:.1f}" for s in seconds)


def choose_batch_copies(model, step, linears: list, timings: Timings,
                        cache_dtype: torch.dtype = torch.float32) -> bool:
    """Give `step`'s batch tier int8-dot copies of its int4 weights where whole decode steps of
    STEP_ROWS[-1] rows in one call time faster with them (AMX tiles only: elsewhere int8-dot has the
    same per-group arithmetic as int4-dot and more bytes); returns whether it did. Cached with the
    kernel timings."""
    batch = TIERS[-1]
    if not integer_dot.has_amx() or step.tiers.get(batch) is None or not any(map(batch_copy_applies, linears)):
        return False
    rows, key = STEP_ROWS[-1], step_key(model, cache_dtype)
    without = timings.measured(key, "batch in one call over int4-dot", 1,
                               lambda: [time_decode_step(model, rows, cache_dtype)])[0]
    made = step.use_batch_copies(linears)
    with_copies = timings.measured(key, "batch in one call over int8-dot copies", 1,
                                   lambda: [time_decode_step(model, rows, cache_dtype)])[0]
    timings.save()
    keep = with_copies < without
    if not keep:
        step.drop_batch_copies()
    log.info("decode steps of %d rows in one call: %.1f ms over int4-dot, %.1f ms over %d int8-dot copies: %s",
             rows, without * 1e3, with_copies * 1e3, made, "copies kept" if keep else "no copies")
    return keep
