"""`customllm bench spec`: prompt-lookup speculative decoding on and off, same engine, same sitting.

Every prompt of the set (`spec_prompts.py`: code edits and summaries) is answered greedily as a chat
turn, `rounds` times with speculation and `rounds` times without, the two interleaved (off, on for
one prompt, on, off for the next, and the other way round in the next round, so drift in the
machine's load cancels out). With `concurrency` C > 1 the prompts go C at a time. One engine serves
both modes (started with `num_speculative_tokens`; the requests without `speculative` decode as
usual), so both share the model, the cache and the prefix cache.

Reported per mode: decode tokens/s (tokens after the first over the time from the first token to
the last, summed over requests: prefill is the same in both modes and left out) and end-to-end
tokens/s; for speculation the acceptance rate (accepted / proposed draft tokens) and the mean
accepted length (tokens a verifying step yields: 1 + accepted / verifications); whether the greedy
answers were identical; and the cost of one lookup on each answer's final token history.
"""
from __future__ import annotations

import asyncio
import logging
import statistics
import time

import numpy as np

from server.cli.bench.engine_bench import drive_engine
from server.cli.bench.spec_prompts import SPEC_PROMPTS
from server.config import EngineConfig, ModelLoadConfig, ServerConfig
from server.engine.prompt_lookup import propose
from server.engine.request import GenerationRequest, SamplingParams
from server.executor.build import build_engine

log = logging.getLogger("customllm.bench")


async def _answer(engine, request_id: str, prompt_ids: list[int], max_tokens: int, speculative: bool) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, speculative=speculative)
    started = time.perf_counter()
    first = None
    tokens: list[int] = []
    async for out in engine.generate(GenerationRequest(request_id, prompt_ids, params)):
        if out.token_ids and first is None:
            first = time.perf_counter()
        tokens += out.token_ids
    ended = time.perf_counter()
    return {"tokens": tokens, "e2e_s": ended - started, "decode_s": ended - (first or ended)}


def bench_spec(model: str | None, tokenizer: str | None, dtype: str, num_speculative_tokens: int,
               lookup_max: int, lookup_min: int, max_tokens: int, rounds: int, concurrency: int,
               kinds: tuple[str, ...] = ("code", "summary")) -> dict:
    prompts = [p for p in SPEC_PROMPTS if p[0] in kinds]
    if not prompts or not set(kinds) <= {p[0] for p in SPEC_PROMPTS}:
        raise ValueError(f"--kinds {','.join(kinds)}: choose among {', '.join(sorted({p[0] for p in SPEC_PROMPTS}))}")
    engine = build_engine(ServerConfig(
        model=ModelLoadConfig(model=model, tokenizer=tokenizer, dtype=dtype),
        engine=EngineConfig(max_num_seqs=max(concurrency, 1), num_speculative_tokens=num_speculative_tokens,
                            prompt_lookup_max=lookup_max, prompt_lookup_min=lookup_min)), start=False)
    speculation = engine.core.speculation
    ids = [engine.tokenizer.encode(engine.chat_template.render([{"role": "user", "content": text}],
                                                               add_generation_prompt=True))
           for _, _, text in prompts]
    runs: dict[bool, list[dict]] = {False: [], True: []}
    answers: dict[bool, dict[int, list[int]]] = {False: {}, True: {}}
    counted = {"drafts": 0, "draft_tokens": 0, "accepted": 0}

    def run_group(group: list[int], speculative: bool, tag: str) -> None:
        before = (speculation.num_drafts, speculation.num_draft_tokens, speculation.num_accepted_tokens)

        async def all_of():
            return await asyncio.gather(*(_answer(engine, f"spec-{tag}-{i}-{speculative}", ids[i], max_tokens,
                                                  speculative) for i in group))
        for i, row in zip(group, asyncio.run(all_of())):
            runs[speculative].append({**row, "prompt": i})
            answers[speculative].setdefault(i, row["tokens"])
        if speculative:
            counted["drafts"] += speculation.num_drafts - before[0]
            counted["draft_tokens"] += speculation.num_draft_tokens - before[1]
            counted["accepted"] += speculation.num_accepted_tokens - before[2]

    def drive() -> None:
        run_group([0], False, "warm-up")
        run_group([0], True, "warm-up")
        runs[False].clear()
        runs[True].clear()
        counted.update(drafts=0, draft_tokens=0, accepted=0)
        groups = [list(range(i, min(i + concurrency, len(ids)))) for i in range(0, len(ids), concurrency)]
        for r in range(rounds):
            for g, group in enumerate(groups):
                order = (False, True) if (r + g) % 2 == 0 else (True, False)
                for speculative in order:
                    run_group(group, speculative, f"{r}-{g}")
            log.info("round %d of %d done", r + 1, rounds)

    drive_engine(engine, drive)
    result = {"model": engine.model_name, "dtype": dtype, "num_speculative_tokens": num_speculative_tokens,
              "prompt_lookup": [lookup_min, lookup_max], "max_tokens": max_tokens, "rounds": rounds,
              "concurrency": concurrency, "prompts": [f"{kind}/{name}" for kind, name, _ in prompts]}
    for speculative, label in ((False, "off"), (True, "on")):
        rows = runs[speculative]
        decode_tokens = sum(max(0, len(r["tokens"]) - 1) for r in rows)
        result[label] = {
            "decode_tokens_per_s": decode_tokens / sum(r["decode_s"] for r in rows),
            "e2e_tokens_per_s": sum(len(r["tokens"]) for r in rows) / sum(r["e2e_s"] for r in rows),
            "tokens": sum(len(r["tokens"]) for r in rows), "requests": len(rows),
            "per_kind_decode_tokens_per_s": {
                kind: sum(max(0, len(r["tokens"]) - 1) for r in rows if prompts[r["prompt"]][0] == kind)
                / sum(r["decode_s"] for r in rows if prompts[r["prompt"]][0] == kind)
                for kind in kinds}}
    result["speedup_decode"] = result["on"]["decode_tokens_per_s"] / result["off"]["decode_tokens_per_s"]
    result["speedup_e2e"] = result["on"]["e2e_tokens_per_s"] / result["off"]["e2e_tokens_per_s"]
    result["acceptance_rate"] = counted["accepted"] / max(1, counted["draft_tokens"])
    result["mean_accepted_length"] = 1 + counted["accepted"] / max(1, counted["drafts"])
    result["verifications"] = counted["drafts"]
    result["identical_answers"] = sum(answers[True][i] == answers[False][i] for i in answers[False])
    result["answers"] = len(answers[False])
    result["per_prompt"] = [
        {"prompt": f"{kind}/{name}", "prompt_tokens": len(ids[i]),
         **{f"{label}_decode_tokens_per_s": sum(max(0, len(r["tokens"]) - 1) for r in runs[mode] if r["prompt"] == i)
            / max(1e-9, sum(r["decode_s"] for r in runs[mode] if r["prompt"] == i))
            for mode, label in ((False, "off"), (True, "on"))},
         "answer_tokens": len(answers[False].get(i, [])), "identical": answers[True].get(i) == answers[False].get(i)}
        for i, (kind, name, _) in enumerate(prompts)]
    result["lookup_us"] = _lookup_cost(ids, answers[False], num_speculative_tokens, lookup_max, lookup_min)
    return result


def _lookup_cost(ids: list[list[int]], answers: dict[int, list[int]], k: int, lookup_max: int,
                 lookup_min: int) -> dict:
    """Microseconds of one lookup over each answer's final history (prompt + answer), median and max."""
    costs = []
    for i, answer in answers.items():
        tokens = np.array(ids[i] + answer, dtype=np.int64)
        repeats = 200
        started = time.perf_counter()
        for _ in range(repeats):
            propose(tokens, k, lookup_max, lookup_min)
        costs.append((time.perf_counter() - started) / repeats * 1e6)
    return {"median": statistics.median(costs), "max": max(costs),
            "history_tokens": max(len(ids[i]) + len(a) for i, a in answers.items())}
