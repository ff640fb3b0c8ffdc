"""A bounded soak: mixed traffic with random parameters, client disconnects and aborts for about
half a minute against a real server. No 5xx, every request finishes, the block pool's integrity
holds and no block stays in use afterwards, and resident memory stops growing after warm-up."""
from __future__ import annotations

import asyncio
import random
import resource
import time

import httpx
import pytest

from server.config import EngineConfig
from tests.api_server import InProcessServer, make_tiny_checkpoint

SOAK_SECONDS = 30
CLIENTS = 12


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("soak-model"))
    # a small cache, so preemption and session eviction happen too
    with InProcessServer(model_dir, engine_config=EngineConfig(kv_cache_memory_gib=160 * 16 * 384 / 2**30,
                                                               max_sessions=8)) as srv:
        yield srv


def random_body(rng: random.Random, i: int) -> tuple[str, dict]:
    params = {"max_tokens": rng.randrange(1, 40), "temperature": rng.choice([0, 0.5, 1.0, 1.5]),
              "top_p": rng.choice([1.0, 0.9, 0.5]), "top_k": rng.choice([0, 1, 20]), "min_p": rng.choice([0, 0.1]),
              "presence_penalty": rng.choice([0, 1.0]), "frequency_penalty": rng.choice([0, -0.5]),
              "repetition_penalty": rng.choice([1.0, 1.3]), "seed": rng.choice([None, i]),
              "stop": rng.choice([None, ["the"], ["\n", "."]]), "n": rng.choice([1, 1, 2]),
              "stream": rng.random() < 0.6, "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.2:
        params["session_id"] = f"soak-{rng.randrange(12)}"
        params["n"] = 1
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "épsilon", "中文", "😀"])
                     for _ in range(rng.randrange(1, 60)))
    if rng.random() < 0.5:
        return "/v1/completions", {"prompt": words, **params}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": words}], **params}


async def client_loop(server, seed: int, deadline: float, statuses: list[int]) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=60) as client:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            path, body = random_body(rng, seed * 10_000 + i)
            action = rng.random()
            if body.get("stream"):
                async with client.stream("POST", server.url + path, json=body) as response:
                    statuses.append(response.status_code)
                    async for line in response.aiter_lines():
                        if action < 0.25 and line.startswith("data: "):
                            break                       # the client walks away mid-stream
            elif action < 0.15:
                try:                                    # gives up waiting: the connection closes
                    await client.post(server.url + path, json=body, timeout=0.05)
                except httpx.TimeoutException:
                    statuses.append(499)
                    continue
            else:
                statuses.append((await client.post(server.url + path, json=body)).status_code)


def test_soak(server):
    async def run(seconds: float) -> list[int]:
        statuses: list[int] = []
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(client_loop(server, seed, deadline, statuses) for seed in range(CLIENTS)))
        return statuses

    warm = asyncio.run(run(SOAK_SECONDS / 3))
    server.settle()
    after_warm_up = rss_mib()
    statuses = warm + asyncio.run(run(2 * SOAK_SECONDS / 3))
    server.settle()
    assert len(statuses) > 100
    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    assert set(statuses) <= {200, 499}, sorted(set(statuses))
    pinned = {block for held in server.engine.kv.sessions.holders() for block in held}
    assert server.engine.kv.pool.num_used_blocks == len(pinned)   # only session pins hold blocks now
    for session in httpx.get(f"{server.url}/v1/sessions").json()["data"]:
        httpx.delete(f"{server.url}/v1/sessions/{session['id']}")
    server.settle()
    assert server.engine.kv.pool.num_used_blocks == 0
    assert httpx.get(f"{server.url}/health").status_code == 200
    grown = rss_mib() - after_warm_up
    assert grown < 100, f"resident memory grew by {grown:.0f} MiB after warm-up"
