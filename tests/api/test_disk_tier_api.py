"""Sessions that survive the process, over HTTP (tiny model, float32, greedy, 127.0.0.1): after a
SIGKILL and a restart a session's next turn reports the restored tokens as cached and answers as a
cold run does; two replicas over one directory continue each other's sessions; GET shows where a
session's blocks are and DELETE removes the disk copies; a short turn is listed; a DELETE during a
turn is not undone by the turn's end; the tier's metrics carry the model name."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.config import ApiConfig, EngineConfig
from tests.api.http import metric, post
from tests.api_server import TEST_KV_CACHE_GIB, InProcessServer, StepGate, subprocess_server

KEYS = ("alice-key", "bob-key")
ALICE, BOB = ({"Authorization": f"Bearer {key}"} for key in KEYS)
SYSTEM = "You are a careful assistant. Answer in one short sentence, and keep every reply brief. " * 5
BS = 16


def chat(url: str, messages: list[dict], headers: dict, session: str | None = None) -> dict:
    body = {"messages": messages, "max_tokens": 8, "temperature": 0}
    if session is not None:
        headers = {**headers, "X-Session-ID": session}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def poll(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached in {timeout} s")


def session_on_disk(url: str, session: str, headers: dict) -> dict:
    """GET the session once every block of it in the pool is on disk too."""
    def written():
        body = httpx.get(f"{url}/v1/sessions/{session}", headers=headers, timeout=10).json()
        return body if body["blocks"]["pool"] and body["blocks"]["disk"] == body["blocks"]["pool"] else None
    return poll(written, what="the session written to disk")


def turns(first_reply: str) -> tuple[list[dict], list[dict]]:
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."}]
    return first, first + [{"role": "assistant", "content": first_reply}, {"role": "user", "content": "Another?"}]


def test_a_session_survives_sigkill_and_restart_warm_and_exact(model_dir, tmp_path):
    # (threads held: warm and cold answers are compared exactly, and the test's own load beside the
    # server could otherwise change its thread count, and a float32 sum's order, between them)
    args = ("--kv-disk-dir", str(tmp_path / "kv"), "--api-key", KEYS[0], "--api-key", KEYS[1], "--no-adaptive-threads")
    with subprocess_server(model_dir, *args) as (process, url):
        first, _ = turns("")
        reply = chat(url, first, ALICE, "s1")
        first_prompt = reply["usage"]["prompt_tokens"]
        listed = session_on_disk(url, "s1", ALICE)
        process.kill()                                       # SIGKILL: no drain, no flush
        process.wait(timeout=30)
    assert oct((tmp_path / "kv").stat().st_mode & 0o777) == "0o700"
    with subprocess_server(model_dir, *args) as (process, url):
        after = httpx.get(f"{url}/v1/sessions/s1", headers=ALICE, timeout=10).json()
        assert after["blocks"] == {"pool": 0, "disk": listed["blocks"]["disk"]}
        assert after["cached_tokens"] == listed["cached_tokens"] and after["num_tokens"] == listed["num_tokens"]
        assert httpx.get(f"{url}/v1/sessions/s1", headers=BOB, timeout=10).status_code == 404
        _, second = turns(reply["choices"][0]["message"]["content"])
        warm = chat(url, second, ALICE, "s1")
        cold = chat(url, second, BOB)                        # another tenant: nothing of alice's is found
        cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= first_prompt // BS * BS and cached % BS == 0 and cached <= listed["cached_tokens"]
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert metric(text, "customllm_kv_tier_hit_blocks_total", '{tier="disk"}') == cached // BS
        assert metric(text, "customllm_kv_tier_restore_seconds_count") == 1
        assert metric(text, "customllm_kv_tier_read_bytes_total", '{tier="disk"}') > 0
        assert metric(text, "customllm_kv_tier_used_bytes", '{tier="disk"}') > 0
        samples = [s for f in text_string_to_metric_families(text) if f.name.startswith("customllm_kv_tier")
                   for s in f.samples]
        assert samples and all(s.labels.get("model_name") == model_dir.name for s in samples)


@pytest.fixture(scope="module")
def replicas(model_dir, tmp_path_factory):
    """Two servers over one disk directory, as two replicas over a shared volume."""
    directory = str(tmp_path_factory.mktemp("shared-kv"))
    engine = EngineConfig(kv_cache_memory_gib=TEST_KV_CACHE_GIB, kv_disk_dir=directory, kv_disk_gib=0.05)
    with InProcessServer(model_dir, api=ApiConfig(api_keys=KEYS), engine_config=engine) as a, \
            InProcessServer(model_dir, api=ApiConfig(api_keys=KEYS), engine_config=engine) as b:
        yield a, b, Path(directory)


def test_replicas_over_one_directory_continue_each_others_sessions(replicas):
    a, b, directory = replicas
    first, _ = turns("")
    reply = chat(a.url, first, ALICE, "moved")
    on_a = session_on_disk(a.url, "moved", ALICE)
    seen = httpx.get(f"{b.url}/v1/sessions/moved", headers=ALICE, timeout=10).json()   # before any turn on b
    assert seen["blocks"] == {"pool": 0, "disk": on_a["blocks"]["disk"]}
    _, second = turns(reply["choices"][0]["message"]["content"])
    warm = chat(b.url, second, ALICE, "moved")                 # the router moved the session to b
    cold = chat(b.url, second, BOB)
    cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= reply["usage"]["prompt_tokens"] // BS * BS and cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
    on_b = session_on_disk(b.url, "moved", ALICE)
    assert on_b["blocks"]["pool"] >= on_a["blocks"]["pool"]
    a.settle(), b.settle()


def test_delete_removes_the_disk_copies(replicas):
    a, b, directory = replicas
    first, _ = turns("")
    first[1]["content"] = "Name a fruit, please."
    chat(a.url, first, ALICE, "doomed")
    session_on_disk(a.url, "doomed", ALICE)
    manifest = a.engine.kv.tiers.session(_tenant(ALICE), "doomed")
    own = [h for h in manifest.block_hashes if not _shared(a, h, "doomed")]
    shared = len(manifest.block_hashes) - len(own)           # the system prompt, also another session's
    assert manifest.block_hashes[shared:] == tuple(own)
    files = [Path(a.engine.kv.tiers.disk.block_path(h)) for h in own]
    assert own and all(f.exists() for f in files)
    deleted = httpx.delete(f"{a.url}/v1/sessions/doomed", headers=ALICE, timeout=10)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    poll(lambda: not any(f.exists() for f in files), what="the session's files removed")
    assert not list((directory).rglob("*.tmp"))
    assert httpx.get(f"{a.url}/v1/sessions/doomed", headers=ALICE, timeout=10).status_code == 404
    assert httpx.get(f"{b.url}/v1/sessions/doomed", headers=ALICE, timeout=10).status_code == 404
    again = chat(a.url, first, ALICE)                           # the prefix cache forgot all but the shared
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == shared * BS
    a.settle()


def _tenant(headers: dict) -> str:
    """The tenant the server derives from an API key (server/api/http_guard.py)."""
    import hashlib
    token = headers["Authorization"].split()[1]
    return "key-" + hashlib.sha256(token.encode()).hexdigest()[:16]


def _shared(srv, block_hash: bytes, session: str) -> bool:
    """Whether another session of the tiers' index lists this block (its file stays on DELETE)."""
    return any(block_hash in m.block_hashes for _, m in srv.engine.kv.tiers.disk._manifests.values()
               if m.session_id != session)


# ---- without a tier ------------------------------------------------------------------------------
def test_a_turn_too_short_to_fill_a_block_is_listed_not_404(server):
    response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "session_id": "brief"})
    assert response.status_code == 200
    body = httpx.get(f"{server.url}/v1/sessions/brief", timeout=10)
    assert body.status_code == 200
    assert body.json()["cached_tokens"] == 0 and body.json()["blocks"] == {"pool": 0, "disk": 0}
    assert body.json()["num_tokens"] == response.json()["usage"]["total_tokens"]
    assert "brief" in [s["id"] for s in httpx.get(f"{server.url}/v1/sessions", timeout=10).json()["data"]]
    assert httpx.delete(f"{server.url}/v1/sessions/brief", timeout=10).status_code == 200
    server.settle()


def test_a_delete_during_a_turn_stays_deleted(server, monkeypatch):
    messages = [{"role": "user", "content": "Tell me about the sea, the sky and the hills " * 3}]
    assert chat(server.url, messages, {}, "inflight")["usage"]["completion_tokens"] > 0
    gate = StepGate(server.engine, monkeypatch)
    result = {}
    turn = threading.Thread(target=lambda: result.update(chat(server.url, messages + [
        {"role": "assistant", "content": "It is wide."}, {"role": "user", "content": "More."}], {}, "inflight")))
    turn.start()
    try:
        assert gate.holding.wait(60)                             # the second turn is in its first step
        deleted = httpx.delete(f"{server.url}/v1/sessions/inflight", timeout=10)
        assert deleted.status_code == 200
    finally:
        gate.release()
    turn.join(60)
    assert result["usage"]["completion_tokens"] > 0
    assert httpx.get(f"{server.url}/v1/sessions/inflight", timeout=10).status_code == 404
    assert "inflight" not in [s["id"] for s in httpx.get(f"{server.url}/v1/sessions", timeout=10).json()["data"]]
    server.settle()


def test_environment_variables_set_the_tier_and_sigterm_writes_what_is_queued(model_dir, tmp_path):
    import signal

    from server.cli.main import build_parser
    from server.cli.serve import config_from_args
    env = {"CUSTOMLLM_KV_DISK_DIR": str(tmp_path / "kv"), "CUSTOMLLM_KV_DISK_GIB": "0.25",
           "CUSTOMLLM_KV_HOST_GIB": "0"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        engine = config_from_args(build_parser().parse_args(["serve"])).engine
    assert (engine.kv_disk_dir, engine.kv_disk_gib, engine.kv_host_gib) == (str(tmp_path / "kv"), 0.25, 0.0)
    with subprocess_server(model_dir, env=env) as (process, url):
        first, _ = turns("")
        chat(url, first, {}, "graceful")
        pinned = httpx.get(f"{url}/v1/sessions/graceful", timeout=10).json()["blocks"]["pool"]
        process.send_signal(signal.SIGTERM)                  # at once: the writes may still be queued
        assert process.wait(timeout=60) == 0
    manifests = list((tmp_path / "kv").glob("*/sessions/*.json"))
    assert len(manifests) == 1 and len(list((tmp_path / "kv").glob("*/*.kvb"))) == pinned > 0
