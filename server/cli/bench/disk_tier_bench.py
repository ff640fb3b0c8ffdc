"""`customllm bench disk-tier`: what the disk tier buys and what it costs, on servers this command
starts itself (`customllm serve` subprocesses on 127.0.0.1, two API keys so that a second tenant can
send the same prompt cold).

- Restart: `--sessions` sessions each get a first chat turn whose prompt is about `--prompt-tokens`
  tokens; once every session's blocks are on disk (GET /v1/sessions/{id}) the server is SIGKILLed and
  started again over the same directory. Each session's second turn is then timed (time to first
  token, streamed) against the identical prompt sent by the other tenant (cold), alternating which
  goes first; the answers must be equal.
- Decode: `--streams` concurrent streams, every request in a session of its own (so each finished
  turn is written to disk), on two servers started together, the tier off and on, measured one at a
  time in ABBA order over `--rounds` pairs; output tokens/s and time per output token, and the bytes
  the tier wrote meanwhile.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from server.cli.bench.serve_bench import WORDS, stream_completion

KEYS = ("bench-a", "bench-b")
HEADERS = [{"Authorization": f"Bearer {key}"} for key in KEYS]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started_server(serve_args: list[str], log_path: Path):
    """`customllm serve` with `serve_args`; yields (process, url) once /health answers 200."""
    port = _free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--api-key", KEYS[0], "--api-key", KEYS[1], "--no-log-requests", *serve_args]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become healthy in 300 s; see {log_path}")
            time.sleep(0.1)
        yield process, url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _system_prompt(url: str, tokens: int, seed: int) -> str:
    """Words whose chat rendering is about `tokens` tokens (measured with /tokenize)."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(tokens)]
    for _ in range(4):
        text = " ".join(words)
        count = httpx.post(f"{url}/tokenize", headers=HEADERS[0], timeout=60,
                           json={"messages": [{"role": "system", "content": text}]}).json()["count"]
        if abs(count - tokens) <= tokens // 100 + 2:
            break
        words = words[:int(len(words) * tokens / count)] if count > tokens else \
            words + [rng.choice(WORDS) for _ in range(int(len(words) * (tokens - count) / count) + 1)]
    return " ".join(words)


def _streamed_turn(url: str, messages: list[dict], headers: dict, session: str | None, output_len: int) -> dict:
    """One streamed chat turn: time to first token, the answer, cached tokens."""
    body = {"messages": messages, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if session is not None:
        headers = {**headers, "X-Session-ID": session}
    started, first, text, usage = time.perf_counter(), None, [], {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    return {"ttft_s": first - started, "text": "".join(text), "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


def _reply(url: str, messages: list[dict], headers: dict, session: str | None, output_len: int) -> dict:
    body = {"messages": messages, "max_tokens": output_len, "temperature": 0.0}
    if session is not None:
        headers = {**headers, "X-Session-ID": session}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600)
    response.raise_for_status()
    return response.json()


def _wait_on_disk(url: str, session: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/v1/sessions/{session}", headers=HEADERS[0], timeout=10).json()
        if body["blocks"]["pool"] and body["blocks"]["disk"] == body["blocks"]["pool"]:
            return body
        time.sleep(0.05)
    raise RuntimeError(f"session {session} was not written to disk in {timeout} s")


def bench_restart(serve_args: list[str], directory: Path, log: Path, sessions: int, prompt_tokens: int,
                  output_len: int) -> dict:
    """Turn 1 of each session, SIGKILL, restart, then turn 2 warm from disk vs cold."""
    tier = ["--kv-disk-dir", str(directory), *serve_args]
    conversations = []
    with started_server(tier, log) as (process, url):
        _reply(url, [{"role": "user", "content": "warm up"}], HEADERS[1], None, 4)
        for s in range(sessions):
            messages = [{"role": "system", "content": _system_prompt(url, prompt_tokens, seed=s)},
                        {"role": "user", "content": "Summarise the text above in one sentence."}]
            first = _reply(url, messages, HEADERS[0], f"restart-{s}", output_len)
            messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "Now say it in five words."}]
            conversations.append((f"restart-{s}", messages, first["usage"]["prompt_tokens"]))
        on_disk = [_wait_on_disk(url, name) for name, _, _ in conversations]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    rows = []
    with started_server(tier, log) as (process, url):
        _reply(url, [{"role": "user", "content": "warm up after the restart"}], HEADERS[1], None, 4)
        for i, (name, messages, first_prompt) in enumerate(conversations):
            order = [(0, name), (1, None)] if i % 2 == 0 else [(1, None), (0, name)]
            timed = {key: _streamed_turn(url, messages, HEADERS[key], session, output_len) for key, session in order}
            rows.append({"session": name, "turn1_prompt_tokens": first_prompt,
                         "turn2_prompt_tokens": timed[0]["prompt_tokens"],
                         "blocks_on_disk_before_kill": on_disk[i]["blocks"]["disk"],
                         "cached_tokens": timed[0]["cached_tokens"], "cold_cached_tokens": timed[1]["cached_tokens"],
                         "ttft_warm_s": timed[0]["ttft_s"], "ttft_cold_s": timed[1]["ttft_s"],
                         "same_answer": timed[0]["text"] == timed[1]["text"], "load_after": os.getloadavg()[0]})
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    warm = statistics.median(r["ttft_warm_s"] for r in rows)
    cold = statistics.median(r["ttft_cold_s"] for r in rows)
    return {"sessions": rows, "ttft_warm_s": warm, "ttft_cold_s": cold, "ratio": warm / cold,
            "restore_lines": [line for line in metrics.splitlines()
                              if line.startswith("customllm_kv_tier_restore_seconds_sum")
                              or line.startswith("customllm_kv_tier_restore_seconds_count")]}


async def _decode_level(url: str, streams: int, requests: int, input_words: int, output_len: int,
                        seed: int) -> dict:
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(streams)
    results = []

    async def one(i: int) -> None:
        prompt = " ".join(rng.choice(WORDS) for _ in range(input_words))
        body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}, "session_id": f"d{seed}-{i}"}
        async with semaphore:
            results.append(await stream_completion(f"{url}/v1/completions", body, HEADERS[0]))
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    elapsed = time.perf_counter() - started
    ok = [r for r in results if r.ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft and r.output_tokens > 1]
    return {"errors": len(results) - len(ok), "output_tokens_per_s": sum(r.output_tokens for r in ok) / elapsed,
            "tpot_p50_s": statistics.median(tpots), "duration_s": elapsed}


def bench_decode(serve_args: list[str], log: Path, streams: int, requests: int, input_words: int, output_len: int,
                 rounds: int) -> dict:
    """Two servers up at once, the tier off and on, measured one at a time in ABBA order (off, on, on,
    off, ...) so that whatever else loads the machine meets both alike; the idle one waits on an
    event and uses no CPU."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="customllm-bench-kv-") as directory, ExitStack() as servers:
        urls = {False: servers.enter_context(started_server(serve_args, log))[1],
                True: servers.enter_context(started_server(["--kv-disk-dir", directory, *serve_args], log))[1]}
        for tier_on, url in urls.items():
            asyncio.run(_decode_level(url, streams, streams, 8, 8, seed=1000 + tier_on))        # warm up
        order = [tier_on for r in range(rounds) for tier_on in ((False, True) if r % 2 == 0 else (True, False))]
        for i, tier_on in enumerate(order):
            written_before = _tier_written(urls[tier_on])
            time.sleep(0.5)                       # the other server's threads are idle by now
            level = asyncio.run(_decode_level(urls[tier_on], streams, requests, input_words, output_len, seed=i))
            runs.append({"tier": tier_on, **level, "tier_written_bytes": _tier_written(urls[tier_on]) - written_before,
                         "load_after": os.getloadavg()[0]})
    on = [r["output_tokens_per_s"] for r in runs if r["tier"]]
    off = [r["output_tokens_per_s"] for r in runs if not r["tier"]]
    return {"runs": runs, "tier_on_tokens_per_s": statistics.fmean(on), "tier_off_tokens_per_s": statistics.fmean(off),
            "on_over_off": statistics.fmean(on) / statistics.fmean(off),
            "median_on_over_off": statistics.median(on) / statistics.median(off)}


def _tier_written(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("customllm_kv_tier_written_bytes_total"))


def bench_disk_tier(serve_args: list[str], sessions: int, prompt_tokens: int, output_len: int, streams: int,
                    requests: int, input_words: int, decode_output_len: int, rounds: int,
                    skip: tuple[str, ...] = ()) -> dict:
    result: dict = {"serve_args": serve_args, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="customllm-bench-") as work:
        log = Path(work) / "servers.log"
        try:
            if "restart" not in skip:
                result["restart"] = bench_restart(serve_args, Path(work) / "kv", log, sessions, prompt_tokens,
                                                  output_len)
            if "decode" not in skip:
                result["decode"] = bench_decode(serve_args, log, streams, requests, input_words, decode_output_len,
                                                rounds)
        except Exception:
            sys.stderr.write(log.read_text(errors="replace")[-4000:] if log.exists() else "")
            raise
    result["load_after"] = os.getloadavg()
    return result
