"""`customllm bench structured`: the structured-output figures on a real model.

- Compile time: each of the ten schemas (`schemas.py`) compiled from scratch `rounds` times (a
  compiler without a cache hit), p50 and p99 overall and the median per schema. The vocabulary
  view llguidance needs is built once before timing (it is per engine, not per schema).
- Validity: `samples` chat answers per schema at `temperature` through the real engine (all at
  once, continuous batching), each constrained by its schema as the API would (`json_spec`): the
  share that parses as JSON and validates against the schema as given (`jsonschema`), and why the
  others did not (finish reason, error). A small model sampled at temperature 1 can ramble inside
  a free-text string until `max_tokens` cuts it: `max_string_length` gives every string without a
  `maxLength` one (as schemas for small models often do); validity is still checked against the
  schemas as written. `wrap_up` is the server's budget-aware wrap-up (`serve --grammar-wrap-up`,
  docs/structured-outputs.md); `wrapped_up` counts the answers it completed (those that ended
  "stop" within `WRAP_UP_REPORT` tokens of `max_tokens`: a finished answer that long was steered to
  its end).
"""
from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time

import jsonschema

from server.api.structured import json_spec
from server.cli.bench.engine_bench import drive_engine
from server.cli.bench.schemas import SCHEMAS
from server.config import EngineConfig, ModelLoadConfig, ServerConfig
from server.engine.grammar import WRAP_UP_MARGIN, GrammarCompiler
from server.engine.request import GenerationRequest, SamplingParams
from server.executor.build import build_engine

log = logging.getLogger("customllm.bench")
WRAP_UP_REPORT = WRAP_UP_MARGIN + 1


def cap_strings(schema, limit: int | None):
    """A copy of `schema` whose string schemas without `maxLength` (and without a pattern, enum or
    const, which shape them already) get `maxLength: limit` (None: unchanged)."""
    if limit is None:
        return schema
    if isinstance(schema, list):
        return [cap_strings(s, limit) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: cap_strings(v, limit) if isinstance(v, (dict, list)) else v for k, v in schema.items()}
    if out.get("type") == "string" and not any(k in out for k in ("maxLength", "pattern", "enum", "const")):
        out["maxLength"] = limit
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def compile_times(engine, rounds: int) -> dict:
    """Seconds to compile each schema from scratch, `rounds` times each."""
    compiler = GrammarCompiler(engine.tokenizer, engine.vocab_size, engine.core.eos_token_ids, cache_size=1)
    started = time.perf_counter()
    compiler.vocabulary()
    vocabulary_s = time.perf_counter() - started
    per_schema: dict[str, list[float]] = {name: [] for name, _, _ in SCHEMAS}
    for _ in range(rounds):
        for name, _, schema in SCHEMAS:
            compiler._cache.clear()
            started = time.perf_counter()
            compiler.compile(json_spec(schema))
            per_schema[name].append(time.perf_counter() - started)
    compiler.close()
    every = [t for times in per_schema.values() for t in times]
    return {"vocabulary_view_ms": vocabulary_s * 1e3, "rounds": rounds,
            "p50_ms": percentile(every, 0.5) * 1e3, "p99_ms": percentile(every, 0.99) * 1e3,
            "max_ms": max(every) * 1e3,
            "median_ms_per_schema": {name: statistics.median(times) * 1e3 for name, times in per_schema.items()}}


async def _answers(engine, samples: int, temperature: float, max_tokens: int, seed: int,
                   max_string_length: int | None) -> list[dict]:
    async def one(index: int, name: str, prompt: str, schema: dict, sample: int) -> dict:
        text = engine.chat_template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        grammar = engine.grammars.compile(json_spec(cap_strings(schema, max_string_length)))
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + index, grammar=grammar)
        request = GenerationRequest(f"structured-{name}-{sample}", engine.tokenizer.encode(text), params)
        outputs = [out async for out in engine.generate(request)]
        answer = "".join(o.text for o in outputs)
        row = {"schema": name, "finish_reason": outputs[-1].finish_reason, "tokens": outputs[-1].usage.completion_tokens,
               "text": answer, "valid": False, "why": None}
        try:
            jsonschema.validate(json.loads(answer), schema)
            row["valid"] = True
        except (ValueError, jsonschema.ValidationError) as exc:
            row["why"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        done.append(row["valid"])
        if len(done) % 20 == 0:
            log.info("%d answers, %d valid", len(done), sum(done))
        return row

    done: list[bool] = []
    jobs = [(name, prompt, schema, sample) for name, prompt, schema in SCHEMAS for sample in range(samples)]
    return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))


def bench_structured(model: str | None, tokenizer: str | None, dtype: str, samples: int, temperature: float,
                     max_tokens: int, rounds: int, max_num_seqs: int, max_string_length: int | None = None,
                     seed: int = 0, wrap_up: bool = True) -> dict:
    engine = build_engine(ServerConfig(model=ModelLoadConfig(model=model, tokenizer=tokenizer, dtype=dtype),
                                       engine=EngineConfig(max_num_seqs=max_num_seqs, grammar_wrap_up=wrap_up,
                                                           max_waiting_requests=samples * len(SCHEMAS) + 1)),
                          start=False)
    result: dict = {"model": engine.model_name, "dtype": str(engine.cache.dtype).removeprefix("torch."),
                    "samples_per_schema": samples, "temperature": temperature, "max_tokens": max_tokens,
                    "max_string_length": max_string_length, "wrap_up": wrap_up}

    def drive() -> None:
        result["compile"] = compile_times(engine, rounds)
        log.info("compile: p50 %.2f ms, p99 %.2f ms", result["compile"]["p50_ms"], result["compile"]["p99_ms"])
        started = time.perf_counter()
        rows = asyncio.run(_answers(engine, samples, temperature, max_tokens, seed, max_string_length))
        result["wall_s"] = time.perf_counter() - started
        result["answers"] = rows
        result["valid"] = sum(r["valid"] for r in rows)
        result["total"] = len(rows)
        result["per_schema"] = {name: sum(r["valid"] for r in rows if r["schema"] == name) for name, _, _ in SCHEMAS}
        result["finish_reasons"] = {reason: sum(r["finish_reason"] == reason for r in rows)
                                    for reason in sorted({r["finish_reason"] for r in rows})}
        result["wrapped_up"] = sum(r["finish_reason"] == "stop" and r["tokens"] > max_tokens - WRAP_UP_REPORT
                                   for r in rows)
        result["mean_tokens"] = statistics.mean(r["tokens"] for r in rows)
        log.info("valid: %d / %d in %.0f s", result["valid"], result["total"], result["wall_s"])

    drive_engine(engine, drive)
    return result
