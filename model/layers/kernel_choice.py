"""The format each Linear is stored and multiplied in, chosen by timing the candidates on this machine.

CPUs differ: on an AMD EPYC with AVX512-BF16 a bfloat16 GEMM over 16 rows is 2-3× faster than
float32 and PyTorch's int4 kernel beats float32 for one row; on an Intel Xeon without native
bfloat16 float32 wins at 16 rows; with AVX512-VNNI the integer-dot formats win decode steps but a
bfloat16 GEMM wins prompt chunks of hundreds of rows. So at load, for every distinct (values, out,
in) of the model, each candidate format (model/layers/quantized_linear.py: float32, bfloat16, int8,
int4, int8-dot, int4-dot, as the weight's values allow) is timed over 1, 16 and 256 rows of the real
shape (random weights, a few dozen milliseconds each, best of several runs), and each Linear takes
- one format for all when one is within 10 % of the fastest at every row count (one copy), else
- for each tier (≤ SMALL_ROWS rows: timed at 1; ≤ PREFILL_ROWS: at 16; more: at 256) the format of
  an earlier tier when it is within 10 % of that tier's fastest, else the fastest (two or three
  copies of the weight: e.g. int4-dot for decode steps and bfloat16 for prompts).

A dense prompt product (float32, bfloat16) is also timed at 768, 1,024 and 1,280 rows whole and in
512-row pieces: oneDNN's blocking for some row counts between one and three pieces is up to 1.6×
slower than for the pieces (o and down products on a 2-core Xeon), so those row ranges go in pieces.

Timings are cached per CPU model, torch version, thread count and version of the C kernels in
`~/.cache/customllm/kernel-timings.json` (`$CUSTOMLLM_CACHE_DIR`, else `$XDG_CACHE_HOME/customllm`),
so later loads on the same machine measure nothing. Delete the file to measure again. Timings taken
while other processes kept more than CONTENDED_CORES of this process's CPUs busy (model/layers/cpu_load.py,
over the measuring when it lasted JUDGED_AFTER_S or more) are cached all the same, with a warning
that names the file: a second server loading beside the first once made bfloat16 prompt products
time slower than float32 ones, and that choice, cached, slows every later load's prompts; but a
restart must make the same choices, or the blocks its disk cache holds (whose fingerprint covers the
packed weights) no longer match.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from model.layers.cpu_load import CpuLoad, LoadSample
from model.layers.linear import Linear
from model.layers.quantize import GROUP, INT4, INT8, QuantizedWeight
from model.layers.quantized_linear import (BFLOAT16, DOT_FORMATS, FLOAT, FLOAT32, PROMPT_PIECE_ROWS, QuantizedLinear,
                                           describe_tiers, format_supported, formats_for, replace_module,
                                           tied_head_table)

log = logging.getLogger("customllm.kernels")

ROWS = (1, 16, 256)             # the rows timed: one stream, a batch of decode steps, a prompt chunk
TIMING_SECONDS = 0.03           # time spent on one (format, rows) beyond its first runs
ONE_COPY_SLACK = 1.10           # a single format within this of the fastest at both row counts wins
PIECE_AT = (768, 1024, 1280)    # prompt rows at which a dense product is timed whole and in pieces
PIECE_GAIN = 1.10               # pieces must be this much faster to be taken
TIMINGS_FILE = "kernel-timings.json"
CONTENDED_CORES = 0.5           # other processes busier than this while timings were taken: a warning
JUDGED_AFTER_S = 0.5            # measuring shorter than this is not judged (jiffies are 10 ms)

# how formats are chosen: "exact" changes nothing; "lean" keeps quantized weights in one of their
# kernels' formats only (one copy, no dense one: the faster of the two measured) and measures float32 / bfloat16 for the float ones; "measured" times
# every format the values allow
MODES = ("exact", "lean", "measured")


def cache_dir() -> Path:
    if os.environ.get("CUSTOMLLM_CACHE_DIR"):
        return Path(os.environ["CUSTOMLLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "customllm"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What timings are valid for: the CPU model, torch version, thread count and the C kernels' sources."""
    from model.layers import native
    return (f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
            f" | kernels {native.sources_digest()}")


def shape_key(values: str, out_features: int, in_features: int) -> str:
    return f"{values}:{out_features}x{in_features}"


def _best_seconds(run, seconds: float) -> float:
    """The least time of `run()` over at least two runs (up to 100 within `seconds`), after one untimed
    (allocation)."""
    run()
    best, runs, deadline = float("inf"), 0, time.perf_counter() + seconds
    while runs < 2 or (time.perf_counter() < deadline and runs < 100):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
        runs += 1
    return best


def _time_rows(fmt: str, values: str, out_features: int, in_features: int, rows_list: tuple[int, ...],
               variants: tuple = ((),), seconds: float = TIMING_SECONDS) -> list[float]:
    """Best seconds of one product by a [out, in] layer of `values` stored as `fmt` (random weights of
    that shape) over each of `rows_list` rows, for each of `variants` (its `prompt_pieces`) in turn."""
    generator = torch.Generator().manual_seed(0)
    layer = QuantizedLinear.from_weight(_placeholder(values, out_features, in_features), None, fmt, fmt)
    found = []
    with torch.inference_mode():
        for rows in rows_list:
            x = torch.randn(rows, in_features, generator=generator)
            for pieces in variants:
                layer.prompt_pieces = pieces
                found.append(_best_seconds(lambda: layer(x), seconds))
    return found


def time_format(fmt: str, values: str, out_features: int, in_features: int,
                seconds: float = TIMING_SECONDS) -> list[float]:
    """Best seconds of one product over each of ROWS rows by a [out, in] layer of `values` stored as
    `fmt` (random weights of that shape)."""
    return _time_rows(fmt, values, out_features, in_features, ROWS, seconds=seconds)


def time_pieces(fmt: str, values: str, out_features: int, in_features: int,
                seconds: float = TIMING_SECONDS) -> list[float]:
    """Best seconds of a [out, in] dense (`fmt`: float32 or bfloat16) product over each of PIECE_AT
    rows, whole and in PROMPT_PIECE_ROWS-row pieces: [whole, pieces] for each."""
    return _time_rows(fmt, values, out_features, in_features, PIECE_AT,
                      ((), ((PROMPT_PIECE_ROWS, PIECE_AT[-1]),)), seconds)


def piece_ranges(seconds: list[float]) -> tuple[tuple[int, int], ...]:
    """`time_pieces`' [whole, pieces] seconds → the row ranges that go in pieces: each PIECE_AT row
    count's (half-way to its neighbours; the first from PROMPT_PIECE_ROWS) where pieces took at most
    1 / PIECE_GAIN of the whole product's time."""
    edges = [PROMPT_PIECE_ROWS] + [(a + b) // 2 for a, b in zip(PIECE_AT, PIECE_AT[1:])] + \
        [PIECE_AT[-1] + (PIECE_AT[-1] - PIECE_AT[-2]) // 2]
    return tuple((edges[i], edges[i + 1]) for i in range(len(PIECE_AT))
                 if seconds[2 * i + 1] * PIECE_GAIN <= seconds[2 * i])


def _placeholder(values: str, out_features: int, in_features: int) -> torch.Tensor | QuantizedWeight:
    """A weight of that shape and those values, cheap to make (the kernels' speed does not depend on
    the values)."""
    if values == FLOAT:
        return torch.full((out_features, in_features), 0.01)
    codes = torch.arange(out_features * in_features).remainder_(15).view(out_features, in_features)
    if values == INT4:
        scale = torch.full((out_features, in_features // GROUP), 0.01)
        return QuantizedWeight(INT4, codes.to(torch.uint8), scale, -8 * scale)
    return QuantizedWeight(INT8, (codes - 7).to(torch.int8), torch.full((out_features, 1), 0.01), None)


class Timings:
    """The JSON cache: {machine key: {shape key: {format: [seconds at each of ROWS]}}}."""

    def __init__(self, path: Path | None = None, load: CpuLoad | None = None):
        self.path = path or cache_dir() / TIMINGS_FILE
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.machine = self.data.setdefault(machine_key(), {})
        self.changed = False
        self.load = load or CpuLoad.of_this_process()
        self.measuring_since: LoadSample | None = None      # the first measurement not yet saved

    def get(self, values: str, out_features: int, in_features: int, fmt: str) -> list[float]:
        return self.measured(shape_key(values, out_features, in_features), fmt, len(ROWS),
                             lambda: time_format(fmt, values, out_features, in_features))

    def pieces(self, values: str, out_features: int, in_features: int, fmt: str) -> tuple[tuple[int, int], ...]:
        """The row ranges in which a [out, in] `fmt` product goes in pieces (`piece_ranges`)."""
        return piece_ranges(self.measured(shape_key(values, out_features, in_features), f"{fmt} in pieces",
                                          2 * len(PIECE_AT), lambda: time_pieces(fmt, values, out_features, in_features)))

    def measured(self, key: str, name: str, count: int, measure) -> list[float]:
        """The `count` timings cached under (key, name), or `measure()`'s, cached (e.g. a shape's
        format's seconds at each of ROWS)."""
        entry = self.machine.setdefault(key, {})
        if len(entry.get(name, ())) != count:                             # not timed, or at other rows
            if self.measuring_since is None:
                self.measuring_since = self.load.sample()
            entry[name] = list(measure())
            self.changed = True
        return entry[name]

    def others_while_measuring(self) -> float | None:
        """The cores other processes kept busy since the first measurement not yet saved; None
        where unknown or measured too briefly to judge."""
        start, end = self.measuring_since, self.load.sample()
        if start is None or end is None or end.at - start.at < JUDGED_AFTER_S:
            return None
        return self.load.others(start, end)

    def save(self) -> None:
        """Write the timings; a warning when other processes competed with them."""
        if not self.changed:
            return
        others = self.others_while_measuring()
        if others is not None and others > CONTENDED_CORES:
            log.warning("kernel timings taken while other processes kept %.1f of the %d CPUs busy may pick "
                        "slower formats; cached all the same (restarts must choose alike): delete %s to "
                        "measure again on a quiet machine", others, self.load.num_cpus, self.path)
        self.changed, self.measuring_since = False, None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
            tmp.replace(self.path)
        except OSError as exc:                                             # a read-only home: measure next time
            log.warning("cannot cache kernel timings in %s: %s", self.path, exc)


def pick(times: dict[str, list[float]], one_copy: bool = False) -> tuple[str, str, str]:
    """(small-step, large-step, prefill format) from {format: [seconds at each of ROWS]};
    `one_copy`: the single format with the least time relative to each tier's fastest."""
    tiers = range(len(ROWS))
    best = [min(t[i] for t in times.values()) for i in tiers]
    good = [[f for f, t in times.items() if t[i] <= ONE_COPY_SLACK * best[i]] for i in tiers]
    single = list(times) if one_copy else [f for f in good[0] if all(f in g for g in good)]
    if single:
        fmt = min(single, key=lambda f: sum(times[f][i] / best[i] for i in tiers))
        return fmt, fmt, fmt
    chosen: list[str] = []
    for i in tiers:
        again = [f for f in chosen if f in good[i]]
        chosen.append(again[0] if again else min(times, key=lambda f: times[f][i]))
    return tuple(chosen)


def candidates(values: str, out_features: int, in_features: int, mode: str) -> tuple[str, ...]:
    """The formats a [out, in] weight of `values` may take: its quantized kernels' alone in "lean"
    mode (when the shape allows one), else every format that holds those values."""
    options = tuple(f for f in formats_for(values) if format_supported(f, out_features, in_features))
    packed = tuple(f for f in options if f in (values, DOT_FORMATS.get(values)))
    return packed if mode == "lean" and packed else options


def _fastest(values: str, out_features: int, in_features: int, mode: str, timings: Timings) -> tuple[str, str, str]:
    """(small-step, large-step, prefill format) of a [out, in] weight of `values` under `mode`."""
    options = candidates(values, out_features, in_features, mode)
    if len(options) == 1:
        return (options[0],) * 3
    return pick({f: timings.get(values, out_features, in_features, f) for f in options},
                one_copy=mode == "lean" and values != FLOAT)


def tier_format(layer: QuantizedLinear, tier: int, mode: str, timings: Timings) -> str:
    """The format the choice gives `layer`'s values and shape for tier `tier` (an index of ROWS):
    what a tier goes back to when its decode steps measured slower in one call
    (model/layers/cpu_step_choice.py)."""
    return _fastest(layer.values, layer.out_features, layer.in_features, mode, timings)[tier]


def choose_formats(model: nn.Module, mode: str, timings: Timings | None = None, keep_codes: bool = False) -> Counter:
    """Store every Linear of `model` (and a tied head, as a Linear of its own when it moves off
    float32) in the formats measured fastest under `mode` (see MODES). Returns a count of the
    (small, large) formats chosen, for the log. `keep_codes`: a quantized layer moved to dense
    formats only keeps its codes reachable (`QuantizedLinear.hold_codes`) until
    `release_held_codes(model)`, for the decode step's choice (model/layers/cpu_step_choice.py)."""
    if mode not in MODES:
        raise ValueError(f"unknown format mode {mode!r}; choose one of {', '.join(MODES)}")
    chosen: Counter = Counter()
    if mode == "exact":
        return chosen
    timings = timings or Timings()
    started = time.monotonic()
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    table = tied_head_table(model)
    if table is not None and table.dtype == torch.float32:
        layers.append(("lm_head", None))
    for name, layer in layers:
        out_features, in_features = table.shape if layer is None else (layer.out_features, layer.in_features)
        values = layer.values if isinstance(layer, QuantizedLinear) else FLOAT
        if layer is not None and not isinstance(layer, QuantizedLinear) and layer.weight.dtype != torch.float32:
            continue                                                       # a 16-bit model: not ours to move
        tiers = _fastest(values, out_features, in_features, mode, timings)
        chosen[(values, *tiers)] += 1
        if layer is None:
            if tiers != (FLOAT32,) * 3:
                model.lm_head = QuantizedLinear.from_weight(table, None, *tiers[:2], prefill_format=tiers[2])
        elif isinstance(layer, QuantizedLinear):
            if tiers != (layer.small_format, layer.large_format, layer.prefill_format):
                moved = layer.with_formats(*tiers)
                if keep_codes:
                    moved.hold_codes(layer.codes_source())
                replace_module(model, name, moved)
        elif tiers != (FLOAT32,) * 3:
            replace_module(model, name, QuantizedLinear.from_weight(layer.weight, layer.bias, *tiers[:2],
                                                                    prefill_format=tiers[2]))
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear) and name != "lm_head" and layer.prefill_format in (FLOAT32, BFLOAT16):
            layer.prompt_pieces = timings.pieces(layer.values, layer.out_features, layer.in_features,
                                                 layer.prefill_format)
    timings.save()
    log.info("weight formats (%s, %.1f s, timings in %s): %s", mode, time.monotonic() - started, timings.path,
             _describe(chosen))
    return chosen


def _describe(counts: Counter) -> str:
    return ", ".join(f"{n} × {v} as {describe_tiers(*tiers)}" for (v, *tiers), n in sorted(counts.items())) or "none"


def describe_formats(model: nn.Module) -> str:
    """How the model's Linears are held, e.g. "120 × int4 as int4 (≤ 4 rows) / bfloat16, 1 × int8 as
    int8" (float32 Linears as "float as float32")."""
    counts: Counter = Counter()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            counts[(module.values, module.small_format, module.large_format, module.prefill_format)] += 1
        elif isinstance(module, Linear):
            fmt = str(module.weight.dtype).removeprefix("torch.")
            counts[(FLOAT, fmt, fmt, fmt)] += 1
    return _describe(counts)
