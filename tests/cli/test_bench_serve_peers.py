"""`customllm bench serve` with servers it starts itself: the command lines it builds for each peer,
the readiness wait (a peer that dies or never answers is an error with its log, and leaves no
process behind), and the time-to-first-token measurement at exact prompt lengths, interleaved over
rounds, against our own server on the tiny model. No peer is needed: the peers' commands are checked
as built, and stand-in processes play the peers that fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model.loading.builtin import builtin_model_path
from server.cli.bench import server_processes as sp
from server.cli.bench.serve_compare import servers_from_args
from server.cli.main import build_parser
from server.config import EngineConfig
from tests.api_server import ROOT, TEST_KV_CACHE_GIB, InProcessServer, make_tiny_checkpoint, tokenizer_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bench-serve"), 0, "max_context=1024")


def bench_serve(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    (cwd / "docs").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "server.cli", "bench", "serve", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# ---- the command lines ---------------------------------------------------------------------------------
def test_llama_server_gets_a_slot_per_stream_sharing_one_cache_and_our_thread_count():
    spec = sp.llama_server_spec("/opt/llama/llama-server", "/m/model.gguf", 18081, 2, 16, 8192)
    assert spec.command == ["/opt/llama/llama-server", "--model", "/m/model.gguf", "--host", "127.0.0.1",
                            "--port", "18081", "--threads", "2", "--threads-batch", "2", "--ctx-size", "8192",
                            "--parallel", "16", "--kv-unified", "--cont-batching", "--no-webui"]
    assert spec.url == "http://127.0.0.1:18081" and spec.health_path == "/health" and spec.env == {}


def test_vllm_runs_from_its_own_python_in_bfloat16_with_its_threads_bound():
    spec = sp.vllm_spec("/peers/vllm-venv/bin/python", "/peers/smollm2-hf", 18082, 2, kv_cache_gib=3,
                        preload=("/usr/lib/libtcmalloc_minimal.so.4", "/peers/libiomp5.so"))
    assert spec.command == ["/peers/vllm-venv/bin/python", "-m", "vllm.entrypoints.openai.api_server",
                            "--model", "/peers/smollm2-hf", "--host", "127.0.0.1", "--port", "18082",
                            "--dtype", "bfloat16", "--disable-log-stats"]
    first_two = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0))[:2])
    assert spec.env == {"VLLM_CPU_OMP_THREADS_BIND": first_two, "VLLM_CPU_KVCACHE_SPACE": "3",
                        "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                        "LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4:/peers/libiomp5.so"}


def test_the_servers_of_one_invocation_ours_first_then_the_peers():
    args = build_parser().parse_args(
        ["bench", "serve", "--start-customllm", "", "--start-customllm=--compile-decode --max-num-seqs 16",
         "--start-llama-server", "/opt/llama-server", "--start-vllm", "/v/bin/python", "--hf-model", "/hf",
         "--peer-url", "http://10.0.0.5:9000/", "--concurrency", "1,16", "--ttft-prompt-tokens", "512,2000",
         "--output-len", "64", "--input-len", "64", "--peer-threads", "2"])
    servers = servers_from_args(args)
    assert [(s.label, s.ours) for s in servers] == [
        ("customllm", True), ("customllm --compile-decode --max-num-seqs 16", True),
        ("http://10.0.0.5:9000", False), ("llama-server", False), ("vllm-cpu", False)]
    ours, compiled = servers[0].spec.command, servers[1].spec.command
    assert ours[:4] == [sys.executable, "-m", "server.cli", "serve"] and ours[4:6] == ["--host", "127.0.0.1"]
    assert len(ours) == 8 and compiled[8:] == ["--compile-decode", "--max-num-seqs", "16"]
    assert servers[2].spec is None and servers[2].url == "http://10.0.0.5:9000"
    llama = servers[3].spec.command
    assert llama[llama.index("--model") + 1] == str(builtin_model_path())          # the built-in GGUF by default
    assert llama[llama.index("--parallel") + 1] == "16" and llama[llama.index("--threads") + 1] == "2"
    # 16 streams of (64 words, about 2 tokens each, + 64 answer tokens + 16) in one cache: 3,328 < 4,096
    assert llama[llama.index("--ctx-size") + 1] == "4096"
    assert servers[4].spec.command[0] == "/v/bin/python" and servers[4].spec.env["OMP_NUM_THREADS"] == "2"
    ports = {s.spec.port for s in servers if s.spec}
    assert len(ports) == 4 and all(s.url == f"http://127.0.0.1:{s.spec.port}" for s in servers if s.spec)


def test_vllm_without_its_model_directory_is_refused(tmp_path):
    result = bench_serve(tmp_path, "--start-vllm", sys.executable)
    assert result.returncode == 2 and "--start-vllm needs --hf-model" in result.stderr


# ---- starting and stopping ---------------------------------------------------------------------------
def test_a_peer_that_exits_is_reported_with_its_status_and_log(tmp_path):
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'error: failed to open GGUF file'\nexit 3\n")
    fake.chmod(0o755)
    started = time.monotonic()
    result = bench_serve(tmp_path, "--url", "http://127.0.0.1:9", "--start-llama-server", str(fake),
                         "--gguf", "/nowhere.gguf", "--server-logs", str(tmp_path / "logs"))
    assert result.returncode == 1
    assert "llama-server exited with status 3 before it was ready" in result.stderr
    assert "error: failed to open GGUF file" in result.stderr and str(tmp_path / "logs") in result.stderr
    assert time.monotonic() - started < 60         # noticed when it exited, not at the 900 s deadline
    missing = bench_serve(tmp_path, "--url", "http://127.0.0.1:9", "--start-llama-server", str(tmp_path / "absent"))
    assert missing.returncode == 1 and f"llama-server could not be started ({tmp_path / 'absent'})" in missing.stderr


def test_a_peer_that_never_answers_is_stopped_with_its_children(tmp_path):
    pids = tmp_path / "pids"
    # a "server" that starts a child and never listens
    code = (f"import os, subprocess, time; child = subprocess.Popen(['sleep', '600']); "
            f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}'); time.sleep(600)")
    spec = sp.ServerSpec("silent-peer", [sys.executable, "-c", code], sp.free_port())
    with pytest.raises(sp.ServerStartError, match=r"silent-peer did not answer /health with 200 within 5 s"):
        with sp.started(spec, tmp_path / "logs", timeout=5):
            pytest.fail("the peer was never ready")
    parent, child = (int(p) for p in pids.read_text().split())
    deadline = time.monotonic() + 10           # the group is killed, then reaped by whoever adopted the child
    while (alive(parent) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(parent) and not alive(child)


def test_ctrl_c_during_a_measurement_stops_the_started_server(tmp_path):
    port = sp.free_port()
    spec = sp.ServerSpec("static", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], port,
                         health_path="/")
    with pytest.raises(KeyboardInterrupt):
        with sp.started(spec, tmp_path / "logs", timeout=60) as server:
            assert httpx.get(server.url + "/").status_code == 200 and server.ready_s >= 0
            pid = server.process.pid
            raise KeyboardInterrupt
    assert server.process.returncode is not None and not alive(pid)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)


# ---- the measurements ----------------------------------------------------------------------------------
def test_ttft_at_exact_prompt_lengths_interleaved_with_a_peer(model_dir, tmp_path):
    out = tmp_path / "serve.json"
    engine = EngineConfig(kv_cache_memory_gib=TEST_KV_CACHE_GIB, block_size=16)
    with InProcessServer(model_dir, engine_config=engine) as server:
        # the same server again as a "peer": the interleaving and the ratios without a real peer
        result = bench_serve(tmp_path, "--url", server.url, "--peer-url", server.url + "/", "--concurrency", "1,2",
                             "--num-prompts", "2", "--input-len", "24", "--output-len", "4",
                             "--ttft-prompt-tokens", "20,70", "--ttft-repeats", "2", "--rounds", "2",
                             "--out", str(out), "--record")
        assert result.returncode == 0, result.stderr[-3000:]
        server.settle()
    report = json.loads(out.read_text())
    assert [s["label"] for s in report["servers"]] == ["customllm", server.url] and report["rounds"] == 2
    for entry in report["servers"]:
        assert [run["round"] for run in entry["rounds"]] == [1, 2]
        for run in entry["rounds"]:
            assert [row["prompt_tokens"] for row in run["ttft"]] == [20, 70]
            for row in run["ttft"]:
                # the server counted exactly the tokens sent
                assert row["errors"] == 0 and row["served_prompt_tokens"] == [row["prompt_tokens"]]
                assert 0 < row["ttft_s"]["p50"]
                # each round's prompts are new, and the same for every server; so the "peer", being the
                # same server measured second, finds them in its prefix cache, and ours never does
                if entry["label"] == "customllm":
                    assert row["cached_tokens_max"] == 0
                else:
                    assert row["cached_tokens_max"] == row["prompt_tokens"] // 16 * 16
            # nor did the warm-up's prompts (24 words: at least a full block each) come back in a round
            if entry["label"] == "customllm":
                assert [level["cached_tokens_max"] for level in run["levels"]] == [0, 0]
            assert all(level["errors"] == 0 for level in run["levels"]) and run["others_cpu_s"] == 0
            assert run["client_cpu_s"] > 0 and "foreign_cpu_s" not in run     # a --url server: no CPU account
        assert set(entry["summary"]["ttft"]) == {"20", "70"}
    [ratio] = report["ratios"]
    assert (ratio["ours"], ratio["peer"]) == ("customllm", server.url)
    ours, peer = (s["summary"] for s in report["servers"])
    assert ratio["ttft_70_peer_over_ours"] == pytest.approx(peer["ttft"]["70"]["p50_s"] / ours["ttft"]["70"]["p50_s"])
    assert ratio["output_c2"] == pytest.approx(ours["levels"]["2"]["output_tokens_per_s"]
                                               / peer["levels"]["2"]["output_tokens_per_s"])
    table = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "| TTFT 20 tok ms | TTFT 70 tok ms |" in table and f"| {server.url} | 2 | " in table
    assert f"- ours/peer, customllm / {server.url}: c=1: decode " in table and "TTFT 70 tok: peer/ours " in table


def test_the_bench_starts_our_server_measures_it_and_stops_it(model_dir, tmp_path):
    out = tmp_path / "serve.json"
    serve_args = f"--model {model_dir} --tokenizer {tokenizer_dir()} --dtype float32 --kv-cache-memory 0.02"
    result = bench_serve(tmp_path, "--start-customllm", serve_args, "--concurrency", "2", "--num-prompts", "2",
                         "--input-len", "8", "--output-len", "4", "--ttft-prompt-tokens", "30", "--ttft-repeats", "1",
                         "--server-logs", str(tmp_path / "logs"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    [entry] = json.loads(out.read_text())["servers"]
    assert entry["label"] == f"customllm {serve_args}" and entry["ready_s"] > 0
    [run] = entry["rounds"]
    assert entry["command"][3:4] == ["serve"] and run["ttft"][0]["served_prompt_tokens"] == [30]
    # the server's own CPU time is counted (and taken out of the machine's busy time)
    assert run["idle_cpu_s"] == {} and isinstance(run["foreign_cpu_s"], float)
    with pytest.raises(httpx.ConnectError):           # stopped once measured
        httpx.get(entry["url"] + "/health", timeout=2)
    assert list((tmp_path / "logs").iterdir())
