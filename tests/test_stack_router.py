"""The scale-out stack on loopback: two `customllm serve` replicas behind nginx started from the
project's own router config (docker/nginx/router.conf.template), as CI can run it without Docker."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api_server import ROOT, free_port, make_tiny_checkpoint, subprocess_server

sys.path.insert(0, str(ROOT / "docker"))
from render_router import render  # noqa: E402

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    model_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("router-model"))
    with subprocess_server(model_dir) as (p1, url1), subprocess_server(model_dir) as (p2, url2):
        prefix = tmp_path_factory.mktemp("nginx")
        port = free_port()
        upstreams = [url1.removeprefix("http://"), url2.removeprefix("http://")]
        (prefix / "router.conf").write_text(render(upstreams, f"127.0.0.1:{port}"))
        temp = {name: prefix / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        (prefix / "nginx.conf").write_text(
            f"daemon off; worker_processes 1; pid {prefix}/nginx.pid; error_log {prefix}/error.log;\n"
            "events { worker_connections 256; }\n"
            f"http {{ access_log off; client_body_temp_path {temp['body']}; proxy_temp_path {temp['proxy']};\n"
            f"  fastcgi_temp_path {temp['fastcgi']}; uwsgi_temp_path {temp['uwsgi']}; scgi_temp_path {temp['scgi']};\n"
            f"  include {prefix}/router.conf; }}\n")
        nginx = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        router = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{router}/router/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert nginx.poll() is None, nginx.stderr.read().decode()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
            yield {"router": router, "replicas": [(p1, url1), (p2, url2)]}
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)


def chat(router: str, session: str | None, messages: list[dict], **extra) -> httpx.Response:
    headers = {"X-Session-ID": session} if session else {}
    return httpx.post(f"{router}/v1/chat/completions", headers=headers, timeout=60,
                      json={"messages": messages, "max_tokens": 6, "temperature": 0, **extra})


def converse(router: str, session: str, turns: int) -> list[int]:
    messages = [{"role": "system", "content": "You answer questions about the weather. " * 3}]
    cached = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"What about day {turn}?"})
        reply = chat(router, session, messages)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    return cached


def test_session_turns_stick_to_one_replica(stack):
    cached = converse(stack["router"], "sticky", 3)
    assert cached[0] == 0 and cached[1] > 0 and cached[2] > cached[1]


def test_sessions_spread_over_both_replicas(stack):
    for i in range(20):
        assert chat(stack["router"], f"spread-{i}", [{"role": "user", "content": f"hello {i}"}]).status_code == 200
    counts = []
    for _, url in stack["replicas"]:
        ids = {s["id"] for s in httpx.get(f"{url}/v1/sessions").json()["data"]}
        counts.append(len({f"spread-{i}" for i in range(20)} & ids))
    assert sum(counts) == 20 and min(counts) > 0, counts


def test_sse_passes_through_unbuffered(stack):
    started = time.monotonic()
    first = last = None
    with httpx.stream("POST", f"{stack['router']}/v1/completions", timeout=60,
                      json={"prompt": "Tell me", "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                first = first or time.monotonic() - started
                json.loads(line[6:])
            if line == "data: [DONE]":
                last = time.monotonic() - started
    assert first is not None and last is not None and first < 0.5 * last, (first, last)


def test_prometheus_scrapes_both_replicas(stack, tmp_path):
    """Debian's Prometheus, with the project's scrape job pointed at the loopback replicas."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    import yaml
    config = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [
        url.removeprefix("http://") for _, url in stack["replicas"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        health = []
        while time.monotonic() < deadline:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2).json()["data"]
                health = [t["health"] for t in targets["activeTargets"]]
                if health == ["up", "up"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            assert process.poll() is None, "prometheus exited"
            time.sleep(0.2)
        assert health == ["up", "up"], health
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_killed_replica_requests_move_on_and_sessions_continue_cold(stack):
    router = stack["router"]
    def conversation(name: str) -> list[dict]:   # unique per session, so no other replica has it cached
        return [{"role": "user", "content": f"{name}: remember the number forty-two, please. " * 3}]
    # find a session that lives on replica 0
    victim_process, victim_url = stack["replicas"][0]
    session = None
    for i in range(40):
        candidate = f"doomed-{i}"
        assert chat(router, candidate, conversation(candidate)).status_code == 200
        if any(s["id"] == candidate for s in httpx.get(f"{victim_url}/v1/sessions").json()["data"]):
            session = candidate
            break
    assert session is not None
    messages = conversation(session)
    warm = chat(router, session, messages).json()
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    victim_process.kill()
    victim_process.wait(timeout=30)
    for i in range(10):
        response = chat(router, None, [{"role": "user", "content": f"still there {i}?"}])
        assert response.status_code == 200, response.text
    cold = chat(router, session, messages)
    assert cold.status_code == 200, cold.text
    # computed cold: the session's own history is not on this replica (only the chat template's
    # shared system-prompt block may be in its prefix cache)
    assert cold.json()["usage"]["prompt_tokens_details"]["cached_tokens"] < \
        warm["usage"]["prompt_tokens_details"]["cached_tokens"]
