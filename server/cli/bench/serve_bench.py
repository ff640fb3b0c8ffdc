"""`customllm bench serve`: a streaming OpenAI-protocol client measuring a running server.

For each concurrency level it keeps that many requests in flight (or, with `--request-rate`, sends
Poisson arrivals) until `--num-prompts` have finished, and reports request throughput, output
tokens/s, time to first token, time per output token and inter-token latency (mean, p50, p90, p99)
and errors. With `--session-turns N` it also measures multi-turn sessions: time to first token of
turn n with the session cached against the same prompt sent cold (a fresh session id). With
`--ttft-prompt-tokens` it times the first token of prompts of exactly those many tokens (random token
ids, one request at a time, never the same prompt twice, so no prefix cache helps).

Several servers (ours, peers it started, `--peer-url`s) are measured interleaved: each round measures
every server in turn (`compare_servers`), so that a drift of the machine touches them all alike.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

from server.cli.bench.sse_client import HttpStatusError, sse_data

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "in distant mountain towns under pale winter light").split()


def synthetic_prompt(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
    return {"mean": statistics.fmean(ordered), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None
    latency: float = 0.0
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    cached_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None


REQUEST_TIMEOUT_S = 600.0


async def stream_completion(url: str, body: dict, headers: dict) -> RequestResult:
    """One streaming chat or completion request; token times from SSE chunk arrivals (sse_client.py:
    a load generator as light as can be, since it shares the CPUs with the server it measures)."""
    try:
        return await asyncio.wait_for(_stream_completion(url, body, headers), REQUEST_TIMEOUT_S)
    except HttpStatusError as exc:
        return RequestResult(False, error=f"HTTP {exc.status}: {exc.text[:200]}")
    except (OSError, EOFError, ValueError, asyncio.TimeoutError) as exc:   # connection, protocol, JSON
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")


async def _stream_completion(url: str, body: dict, headers: dict) -> RequestResult:
    started = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with contextlib.aclosing(sse_data(url, body, headers)) as events:
        async for data in events:
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return RequestResult(False, error=str(chunk["error"])[:200])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                if piece:
                    stamps.append(time.perf_counter())
    end = time.perf_counter()
    output_tokens = usage["completion_tokens"] if usage else len(stamps)
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return RequestResult(True, ttft=(stamps[0] - started) if stamps else None, latency=end - started,
                         output_tokens=output_tokens, itls=[b - a for a, b in zip(stamps, stamps[1:])],
                         cached_tokens=cached, prompt_tokens=(usage or {}).get("prompt_tokens"))


def completion_body(model: str, prompt: str | list[int], output_len: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}


async def run_level(url: str, model: str, concurrency: int, num_prompts: int, input_words: int, output_len: int,
                    request_rate: float | None, headers: dict, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [synthetic_prompt(rng, input_words) for _ in range(num_prompts)]
    results: list[RequestResult] = []
    semaphore = asyncio.Semaphore(concurrency)
    done = 0

    async def one(prompt: str) -> None:
        nonlocal done
        async with semaphore:
            results.append(await stream_completion(f"{url}/v1/completions", completion_body(model, prompt, output_len),
                                                   headers))
        done += 1
        print(f"\r  concurrency {concurrency}: {done}/{num_prompts}", end="", file=sys.stderr, flush=True)

    started = time.perf_counter()
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(one(prompt)))
        if request_rate:
            await asyncio.sleep(rng.expovariate(request_rate))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    print(file=sys.stderr)
    ok = [r for r in results if r.ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    return {
        "concurrency": concurrency, "num_prompts": num_prompts, "errors": len(results) - len(ok),
        "error_samples": [r.error for r in results if not r.ok][:3], "duration_s": elapsed,
        "request_throughput": len(ok) / elapsed, "output_tokens_per_s": sum(r.output_tokens for r in ok) / elapsed,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]), "tpot_s": percentiles(tpots),
        "itl_s": percentiles([x for r in ok for x in r.itls]), "e2e_s": percentiles([r.latency for r in ok]),
        # the streams' decode rate together: each stream makes a token per TPOT
        "decode_tokens_per_s": concurrency / percentiles(tpots)["p50"] if tpots else float("nan"),
        "cached_tokens_max": max((r.cached_tokens for r in ok), default=0),    # servers that report it
    }


# random prompt tokens are drawn from these ids: clear of the special tokens at the start of a
# vocabulary, within any vocabulary this server family ships (SmolLM2's has 49,152)
PROMPT_TOKEN_IDS = range(1000, 20000)


def token_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.choice(PROMPT_TOKEN_IDS) for _ in range(length)]


async def run_ttft(url: str, model: str, prompt_tokens: int, repeats: int, headers: dict, seed: int) -> dict:
    """Time to first token of `repeats` prompts of exactly `prompt_tokens` token ids, one at a time
    (max_tokens 1); each prompt is new, so nothing of it can be cached."""
    rng = random.Random(seed)
    results = []
    for _ in range(repeats):
        body = completion_body(model, token_prompt(rng, prompt_tokens), 1)
        results.append(await stream_completion(f"{url}/v1/completions", body, headers))
    ok = [r for r in results if r.ok and r.ttft is not None]
    return {"prompt_tokens": prompt_tokens, "repeats": repeats, "errors": len(results) - len(ok),
            "error_samples": [r.error for r in results if not r.ok][:3],
            # what the server counted, when it reports usage: the same as asked, or the prompt was changed
            "served_prompt_tokens": sorted({r.prompt_tokens for r in ok if r.prompt_tokens is not None}),
            "cached_tokens_max": max((r.cached_tokens for r in ok), default=0),
            "ttft_s": percentiles([r.ttft for r in ok])}


async def run_sessions(url: str, model: str, turns: int, output_len: int, headers: dict, seed: int,
                       num_sessions: int = 3) -> dict:
    """TTFT of each turn of a chat session vs the identical prompt sent without a session."""
    rng = random.Random(seed)
    warm_ttfts: dict[int, list[float]] = {}
    cold_ttfts: dict[int, list[float]] = {}
    cached: dict[int, list[int]] = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        for s in range(num_sessions):
            session_id = f"bench-session-{seed}-{s}"
            messages = [{"role": "system", "content": synthetic_prompt(rng, 120)}]
            for turn in range(1, turns + 1):
                messages.append({"role": "user", "content": synthetic_prompt(rng, 40)})
                body = {"model": model, "messages": messages, "max_tokens": output_len, "temperature": 0.0,
                        "stream": True, "stream_options": {"include_usage": True}}
                warm = await stream_completion(f"{url}/v1/chat/completions",
                                               {**body, "session_id": session_id}, headers)
                # cold: same prompt, a tenant-salted prefix cache cannot help a fresh random prefix
                cold_body = {**body, "messages": [{"role": "system", "content": f"[{rng.random():.12f}]"}]
                             + messages}
                cold = await stream_completion(f"{url}/v1/chat/completions", cold_body, headers)
                if not (warm.ok and cold.ok):
                    raise RuntimeError(f"session benchmark request failed: {warm.error or cold.error}")
                warm_ttfts.setdefault(turn, []).append(warm.ttft)
                cold_ttfts.setdefault(turn, []).append(cold.ttft)
                cached.setdefault(turn, []).append(warm.cached_tokens)
                messages.append({"role": "assistant", "content": "ok"})
                await client.delete(f"{url}/v1/sessions/{session_id}", headers=headers) if turn == turns else None
    return {str(t): {"ttft_session_s": statistics.median(warm_ttfts[t]), "ttft_cold_s": statistics.median(cold_ttfts[t]),
                     "ratio": statistics.median(warm_ttfts[t]) / statistics.median(cold_ttfts[t]),
                     "cached_tokens": statistics.median(cached[t])} for t in warm_ttfts}


def plot(results: list[dict], path: str, title: str) -> str | None:
    """PNG of throughput and latency against concurrency; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    conc = [r["concurrency"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(conc, [r["output_tokens_per_s"] for r in results], marker="o")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("throughput")
    for key, label in (("ttft_s", "TTFT p50"), ("itl_s", "ITL p50")):
        ax2.plot(conc, [r[key]["p50"] * 1e3 for r in results], marker="o", label=label)
    ax2.plot(conc, [r["itl_s"]["p99"] * 1e3 for r in results], marker="x", label="ITL p99")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrent streams")
    ax2.set_ylabel("ms")
    ax2.set_title("latency")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def discover_model(url: str, headers: dict) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{url}/v1/models", headers=headers)
        response.raise_for_status()
        return response.json()["data"][0]["id"]


@dataclass(frozen=True)
class ServePlan:
    """What each server is measured on, every round."""

    concurrencies: list[int]
    num_prompts: int
    input_words: int
    output_len: int
    request_rate: float | None = None
    ttft_prompt_tokens: tuple[int, ...] = ()
    ttft_repeats: int = 3
    seed: int = 0


def measure_server(url: str, model: str, plan: ServePlan, headers: dict, seed: int) -> dict:
    """One round on one server: a streaming run at each concurrency level, then the TTFT prompts."""
    levels = [asyncio.run(run_level(url, model, concurrency, max(plan.num_prompts, concurrency), plan.input_words,
                                    plan.output_len, plan.request_rate, headers, seed + concurrency))
              for concurrency in plan.concurrencies]
    ttft = [asyncio.run(run_ttft(url, model, tokens, plan.ttft_repeats, headers, seed + 7919 * tokens))
            for tokens in plan.ttft_prompt_tokens]
    return {"levels": levels, "ttft": ttft}


# a warm-up's prompts come from seeds no round uses (Random(-n) is Random(n): no negative seeds), so that
# no timed prompt is in a server's prefix cache
WARM_UP_SEED_OFFSET = 10**9


def warm_up(url: str, model: str, plan: ServePlan, headers: dict) -> None:
    """What a fresh server does once (allocations, compiled shapes, caches) done before anything is timed:
    the largest concurrency with short answers and one prompt of each TTFT length."""
    top = max(plan.concurrencies)
    seed = plan.seed + WARM_UP_SEED_OFFSET
    asyncio.run(run_level(url, model, top, top, plan.input_words, min(8, plan.output_len), None, headers, seed))
    for tokens in plan.ttft_prompt_tokens:
        asyncio.run(run_ttft(url, model, tokens, 1, headers, seed + tokens))


def bench_serve(url: str, plan: ServePlan, session_turns: int, api_key: str | None) -> dict:
    """One server, one round (and the session turns when asked)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = url.rstrip("/")
    model = asyncio.run(discover_model(url, headers))
    result = {"url": url, "model": model, "input_words": plan.input_words, "output_len": plan.output_len,
              **measure_server(url, model, plan, headers, plan.seed)}
    if session_turns:
        result["sessions"] = asyncio.run(run_sessions(url, model, session_turns, plan.output_len, headers, plan.seed))
    return result
