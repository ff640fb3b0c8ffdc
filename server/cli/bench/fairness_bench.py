"""`customllm bench fairness`: does one tenant's flood starve another? Against a running server
started with (at least) two API keys: tenant A sends requests one after another, first alone, then
while tenant B keeps `--flood-concurrency` requests of `--flood-prompts` prompts each in flight
(its 429s counted, not retried at once). A streams, so its latency splits into the wait for its
first token (a slot and the prefill) and the rest (decoding in a batch it shares). Reports A's
success rate and latencies (p50, p90) in both phases and their ratio; the target is ≥ 95% success
and p50 ≤ 3× alone."""
from __future__ import annotations

import asyncio
import time

import httpx

from server.cli.bench.serve_bench import percentiles


async def _tenant_a(client: httpx.AsyncClient, url: str, key: str, count: int, max_tokens: int) -> dict:
    """`count` streamed requests one after another: latency to the last token, and to the first (the
    wait for a slot plus the prefill) apart from it."""
    latencies, first_tokens, failures = [], [], 0
    for i in range(count):
        body = {"prompt": f"tenant A, request {i}: tell me about the sea", "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0, "stream": True}
        started = time.perf_counter()
        first = None
        try:
            async with client.stream("POST", f"{url}/v1/completions", json=body,
                                     headers={"Authorization": f"Bearer {key}"}) as response:
                ok = response.status_code == 200
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.perf_counter() - started
                    ok = ok and '"error"' not in line
        except httpx.HTTPError:
            ok = False
        if ok and first is not None:
            latencies.append(time.perf_counter() - started)
            first_tokens.append(first)
        else:
            failures += 1
    return {"requests": count, "succeeded": count - failures, "success_rate": (count - failures) / count,
            "latency_s": percentiles(latencies), "first_token_s": percentiles(first_tokens)}


async def _flood(client: httpx.AsyncClient, url: str, key: str, stop: asyncio.Event, prompts: int,
                 max_tokens: int, counts: dict) -> None:
    body = {"prompt": [f"flood {i}" for i in range(prompts)], "max_tokens": max_tokens, "ignore_eos": True}
    while not stop.is_set():
        try:
            response = await client.post(f"{url}/v1/completions", json=body,
                                         headers={"Authorization": f"Bearer {key}"})
            counts[response.status_code] = counts.get(response.status_code, 0) + 1
            if response.status_code == 429:
                await asyncio.sleep(0.05)      # a flooding client's back-off, as short as it likes
        except httpx.HTTPError:
            counts["error"] = counts.get("error", 0) + 1


async def _bench(url: str, key_a: str, key_b: str, requests: int, max_tokens: int, flood_concurrency: int,
                 flood_prompts: int, flood_max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=flood_concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        alone = await _tenant_a(client, url, key_a, requests, max_tokens)
        stop, counts = asyncio.Event(), {}
        flooders = [asyncio.create_task(_flood(client, url, key_b, stop, flood_prompts, flood_max_tokens, counts))
                    for _ in range(flood_concurrency)]
        started = time.perf_counter()
        try:
            flooded = await _tenant_a(client, url, key_a, requests, max_tokens)
        finally:
            stop.set()
            await asyncio.gather(*flooders, return_exceptions=True)
        flood_s = time.perf_counter() - started
    ratio = flooded["latency_s"]["p50"] / alone["latency_s"]["p50"]
    # what the flood got meanwhile: its answered requests' tokens over the phase (the requests still in
    # flight when it stopped are not counted)
    flood_tokens = counts.get(200, 0) * flood_prompts * flood_max_tokens
    return {"alone": alone, "flooded": flooded, "flood_responses": {str(k): v for k, v in counts.items()},
            "flood_phase_s": flood_s, "flood_output_tokens_per_s": flood_tokens / flood_s,
            "p50_ratio": ratio, "met": flooded["success_rate"] >= 0.95 and ratio <= 3.0}


def bench_fairness(url: str, key_a: str, key_b: str, requests: int = 20, max_tokens: int = 16,
                   flood_concurrency: int = 16, flood_prompts: int = 16, flood_max_tokens: int = 16) -> dict:
    return asyncio.run(_bench(url, key_a, key_b, requests, max_tokens, flood_concurrency, flood_prompts,
                              flood_max_tokens))
