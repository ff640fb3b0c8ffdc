"""What the families' one-call CPU decode steps share (model/families/llama_cpu_step.py,
model/families/custom_llm_cpu_step.py; their C in model/layers/native/*_decode_step.c): a weight in
an integer-dot format as the C side sees it, and the Python half of a step: descriptors of the
model's layers per row-count tier, bound to the cache's tensors, and the one call.

Both C entry points take (h, rows, shape, layers, num_layers, cos, sin, slot_mapping, block_tables,
max_blocks, context_lens, block_size, window); a family's step supplies the layer descriptors, the
shape and its rotation tables.
"""
from __future__ import annotations

import ctypes
import logging

import torch

from model.cache.batch import PagedBatch
from model.layers import integer_dot
from model.layers.cpu_decode_attention import _DTYPES as CACHE_DTYPES
from model.layers.quantize import GROUP, INT4, INT8, quantize
from model.layers.quantized_linear import (INT4_DOT, INT8_DOT, PREFILL_ROWS, SMALL_ROWS, QuantizedLinear,
                                           replace_module)

log = logging.getLogger("customllm.model")

I64, PTR = ctypes.c_int64, ctypes.c_void_p
TIERS = (SMALL_ROWS, PREFILL_ROWS)      # steps of ≤ 4 rows, ≤ 64 rows: QuantizedLinear's decode tiers


class DotWeight(ctypes.Structure):
    """decode_step.h's DotWeight."""
    _fields_ = [("bits", I64), ("packed", PTR), ("scale", PTR), ("out_features", I64), ("in_padded", I64),
                ("half_scales", I64)]


def dot_weight(linear, rows: int) -> DotWeight | None:
    """The packed weight a product over `rows` rows uses, when it is an integer-dot one (no bias)."""
    if not isinstance(linear, QuantizedLinear) or linear.bias is not None:
        return None
    fmt = linear.format_for(rows)
    if fmt == INT4_DOT:
        packed = linear.weight_int4_dot
        return DotWeight(4, packed.data_ptr(), None, linear.out_features, packed.shape[1] * GROUP,
                         int(integer_dot.int4_half_scales(packed)))
    if fmt == INT8_DOT:
        packed = linear.weight_int8_dot
        return DotWeight(8, packed.data_ptr(), linear.scale_int8_dot.data_ptr(), linear.out_features,
                         packed.shape[1] * GROUP, 0)
    return None


def batch_copy_applies(linear) -> bool:
    """Whether the step's batch tier could multiply `linear` by an int8-dot copy: int4 values it
    multiplies in int4-dot there, no bias."""
    return (isinstance(linear, QuantizedLinear) and linear.values == INT4 and linear.bias is None
            and linear.format_for(PREFILL_ROWS) == INT4_DOT)


def dot_capable(linears: list) -> bool:
    """Whether every one of `linears` could be held in an integer-dot format: quantized Linears
    without bias whose codes are at hand, on a CPU with AVX512-VNNI (else the step could not take
    them anyway)."""
    from model.layers import integer_dot
    from model.layers.quantized_linear import DOT_FORMATS
    return integer_dot.has_vnni() and all(isinstance(m, QuantizedLinear) and m.values in DOT_FORMATS
                                          and m.bias is None and m.holds_codes for m in linears)


def all_dot(linears: list) -> bool:
    """Whether every one of `linears` multiplies decode steps (both tiers) in an integer-dot format."""
    return all(dot_weight(linear, rows) is not None for linear in linears for rows in TIERS)


def hold_in_dot_formats(model, linears: list, decode_tiers: bool = False) -> int:
    """Hold `linears` (modules of `model`, `dot_capable`) in the integer-dot format of their values
    where the kernel choice took PyTorch's int4 / int8 kernels for a shape, in every tier (so a lean
    model keeps one copy; dense copies for prompts stay): the C step multiplies only integer-dot
    weights, and a step in one call gains more than a product's format does. `decode_tiers`: also
    where it took float32 or bfloat16 for decode steps (≤ PREFILL_ROWS rows), which is measured
    (model/layers/cpu_step_choice.py). Returns how many were changed."""
    from model.layers.quantized_linear import DOT_FORMATS
    changed = 0
    for name, linear in with_names(model, linears):
        small, large, prefill = linear.small_format, linear.large_format, linear.prefill_format
        if decode_tiers:
            small, large = (DOT_FORMATS[linear.values],) * 2
        moved = tuple(DOT_FORMATS.get(fmt, fmt) for fmt in (small, large, prefill))
        if moved != (linear.small_format, linear.large_format, linear.prefill_format):
            replace_module(model, name, linear.with_formats(*moved))
            changed += 1
    return changed


def with_names(model, modules: list) -> list[tuple[str, object]]:
    """(name in `model`, module) of each of `modules`, for `replace_module`."""
    names = {id(module): name for name, module in model.named_modules()}
    return [(names[id(module)], module) for module in modules]


def step_argtypes(shape_type, layer_type) -> list:
    return [PTR, I64, ctypes.POINTER(shape_type), ctypes.POINTER(layer_type), I64, PTR, PTR, PTR, PTR, I64, PTR,
            I64, I64]


class CpuDecodeStep:
    """A model's step: `layers(rows)` gives the ctypes array of layer descriptors for a tier (None
    when some weight of that tier is not integer-dot); each descriptor has a `cache` field, filled
    here from the cache's tensors (re-bound when they change); `shape` has a `cache_dtype`."""

    def __init__(self, kernel, shape, keep_alive: list):
        self.kernel, self.shape, self.keep_alive = kernel, shape, keep_alive
        # id(linear) → (linear, packed, scale): int8-dot copies of int4 weights for batches of decode
        # steps (`use_batch_copies`), the linear kept so that its id names it alone
        self.batch_copies: dict[int, tuple] = {}
        self.tiers = {rows: self.layers(rows) for rows in TIERS}
        self._cache_key: tuple | None = None

    def layers(self, rows: int):
        raise NotImplementedError

    def weight(self, linear, rows: int) -> DotWeight | None:
        """What a product of `linear` over `rows` rows multiplies by in the step: its int8-dot copy
        for a batch (more than SMALL_ROWS rows) where the step holds one, else `dot_weight`."""
        entry = self.batch_copies.get(id(linear)) if rows > SMALL_ROWS else None
        if entry is not None and entry[0] is linear:
            _, packed, scale = entry
            return DotWeight(8, packed.data_ptr(), scale.data_ptr(), linear.out_features, packed.shape[1] * GROUP, 0)
        return dot_weight(linear, rows)

    def use_batch_copies(self, linears: list) -> int:
        """Batches of decode steps multiply the int4 weights among `linears` by int8-dot copies of
        them, requantized per row: on AMX tiles an int8-dot product sums whole rows with no scaling
        per group of 32 (model/layers/native/quant_matmul.c), where int4-dot's per-group arithmetic
        bounds it. Only the step's batch tier reads them: one-row steps and prompt chunks keep the
        int4 values themselves. Returns how many copies were made."""
        for linear in linears:
            if batch_copy_applies(linear) and id(linear) not in self.batch_copies:
                weight = quantize(linear.quantized_weight().dequantize(), INT8)
                self.batch_copies[id(linear)] = (linear, *integer_dot.pack_int8_dot(weight))
        self._rebuild_tiers_on()
        return len(self.batch_copies)

    def drop_batch_copies(self) -> None:
        """Batches multiply by the int4 weights again (the copies are let go)."""
        self.batch_copies = {}
        self._rebuild_tiers_on()

    def _rebuild_tiers_on(self) -> None:
        """The descriptors of the tiers now on made again (after the weights they point at changed)."""
        self.rebuild(off=[rows for rows, layers in self.tiers.items() if layers is None])

    @property
    def usable(self) -> bool:
        return any(layers is not None for layers in self.tiers.values())

    def tier_names(self) -> str:
        return " and ".join(f"≤ {rows} rows" for rows, layers in self.tiers.items() if layers is not None)

    def rebuild(self, off: list[int]) -> None:
        """Descriptors made again over the model's layers as they are now, tiers `off` (row
        limits) left to the layers; the cache is bound again at the next step."""
        self.tiers = {rows: None if rows in off else self.layers(rows) for rows in TIERS}
        self._cache_key = None

    def _bind_cache(self, cache: list[torch.Tensor]) -> bool:
        key = tuple(layer.data_ptr() for layer in cache)
        if key == self._cache_key:
            return True
        dtype = cache[0].dtype
        if dtype not in CACHE_DTYPES or not all(layer.is_contiguous() and layer.dtype == dtype for layer in cache):
            return False
        for layers in self.tiers.values():
            if layers is not None:
                for layer, pointer in zip(layers, key):
                    layer.cache = pointer
        self.shape.cache_dtype = CACHE_DTYPES[dtype]
        self._cache_key = key
        return True

    def run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PagedBatch,
            cache: list[torch.Tensor]) -> bool:
        """Every layer of a decode-only step over h [T, d] (updated in place), cos / sin the
        family's rotation tables for the step; False, touching nothing, when this step is not one
        the C step takes (then the caller runs the layers)."""
        if torch.compiler.is_compiling():        # a compiled graph keeps the layers (checked before any ctypes object)
            return False
        rows = h.shape[0]
        layers = self.tiers[SMALL_ROWS] if rows <= SMALL_ROWS else self.tiers[PREFILL_ROWS] if rows <= PREFILL_ROWS \
            else None
        if layers is None or not batch.is_decode_only or not self._bind_cache(cache):
            return False
        tables, lens = batch.block_tables, batch.context_lens
        if not (tables.is_contiguous() and lens.is_contiguous() and h.is_contiguous() and cos.is_contiguous()
                and sin.is_contiguous()):
            return False
        status = self.kernel(h.data_ptr(), rows, ctypes.byref(self.shape), layers, len(layers), cos.data_ptr(),
                             sin.data_ptr(), batch.slot_mapping.data_ptr(), tables.data_ptr(), tables.shape[1],
                             lens.data_ptr(), batch.block_size, -1 if batch.window is None else batch.window)
        if status:
            raise MemoryError("decode step: no memory for a step's scratch rows")
        return True


def install(model, linears_of, make_step, choice: tuple | None = None) -> bool:
    """Give `model` its one-call step (`make_step(model)`, set as `model.cpu_decode_step`) where some
    tier can be all integer-dot; returns whether it did. `linears_of(model)` lists the projections
    the step multiplies (each joined group as one).

    Without `choice`, projections the kernel choice held in PyTorch's int4 / int8 kernels move to
    integer-dot (`hold_in_dot_formats`) and a tier it held in float32 or bfloat16 stays with the
    layers. With `choice` = (the kernel choice's mode, its Timings[, the cache's dtype]), such a
    tier is timed both ways, whole decode steps in the chosen formats and in one call over
    integer-dot ones, and keeps the faster (model/layers/cpu_step_choice.py). Parts then joinable are joined."""
    from model.layers.quantized_linear import fuse_quantized_projections
    linears = list(linears_of(model))
    if not dot_capable(linears):
        return False
    measure = choice is not None and not all_dot(linears)
    if measure:
        from model.layers.cpu_step_choice import StepChoice
        timing = StepChoice(model, *choice)
        timing.time_layers()
    changed = hold_in_dot_formats(model, linears, decode_tiers=measure)
    if changed:
        fuse_quantized_projections(model)        # parts whose formats differed can be joined now
        log.info("%d projections' decode tiers now integer-dot, for the one-call decode step", changed)
    step = make_step(model)
    if not step.usable:
        return False
    model.cpu_decode_step = step
    if measure:
        timing.time_one_call_and_choose(step, linears_of)
        if not step.usable:
            model.cpu_decode_step = None
            return False
    log.info("decode steps of %s: every layer in one C call (integer-dot products)", step.tier_names())
    if choice is not None and choice[0] == "measured":
        from model.layers.cpu_step_choice import choose_batch_copies
        choose_batch_copies(model, step, list(linears_of(model)), *choice[1:])
    return True
