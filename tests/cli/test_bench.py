"""`customllm bench engine|structured|serve` as commands, on the tiny model: they drive the real engine and a
real server, write their JSON and append their tables with `--record`. No figure is asserted
(performance is measured by these commands, not tested); what is checked is that they run, that
their results hang together, and the byte counts behind the floors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from model.config import preset
from model.registry import build_model, output_head_weight
from server.cli.bench.engine_bench import decode_step_seconds
from server.cli.bench.structured_bench import cap_strings
from server.cli.bench.memory import cache_bytes_read, weight_bytes_touched
from server.config import ApiConfig, EngineConfig
from tests.api_server import TEST_KV_CACHE_GIB, InProcessServer, make_tiny_checkpoint, tokenizer_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # room for the session benchmark's chat turns (a system prompt of 120 words and 40 per turn)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bench"), 0, "max_context=1024")


def run_bench(cwd, *args: str) -> subprocess.CompletedProcess:
    """`customllm bench ...` in `cwd` (where `--record` appends to docs/benchmarks.md)."""
    (cwd / "docs").mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "server.cli", "bench", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# ---- the bytes a decode step must move -------------------------------------------------------------
# each family's expert parameters and embedding tables, named as its checkpoints name them
EXPERT_NAMES = {"custom-llm-tiny": ".routed_experts.", "shomsher-tiny": ".experts.", "smart-llm-tiny": ".routed_experts."}
EMBEDDINGS = {"token_embeddings.weight", "position_embeddings.weight", "model.embed_tokens.weight", "tok_emb.weight",
              "token_embedding.weight"}


@pytest.mark.parametrize("name", ["custom-llm-tiny", "shomsher-tiny", "smart-llm-tiny", "llama-tiny", "llama-tiny-tied"])
@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_weight_bytes_touched_counts_routed_experts_and_embedding_rows(name, batch_size):
    config = preset(name.removesuffix("-tied"))
    if name.endswith("-tied"):           # as the built-in model: the head is the embedding table
        config = config.replace(tie_word_embeddings=True)
    model = build_model(config, device="cpu", dtype=torch.float32)
    num_experts = getattr(config, "num_routed_experts", None) or getattr(config, "num_experts", 0)
    top_k = next((getattr(config, key) for key in ("top_k_experts", "num_experts_per_token") if hasattr(config, key)),
                 0)
    head = output_head_weight(model)
    expected = 0.0
    for param_name, param in model.named_parameters():    # a tied head's table appears once, as the head
        size = param.numel() * 4
        if name in EXPERT_NAMES and EXPERT_NAMES[name] in param_name:
            size *= 1 - (1 - top_k / num_experts) ** batch_size
        elif param_name in EMBEDDINGS and param is not head:
            size *= min(batch_size, param.shape[0]) / param.shape[0]
        expected += size
    assert (num_experts > top_k > 0) == (name in EXPERT_NAMES)
    assert weight_bytes_touched(model, batch_size) == pytest.approx(expected, rel=1e-6)
    everything = sum(p.numel() * 4 for p in model.parameters())
    assert weight_bytes_touched(model, batch_size) <= everything
    if name == "llama-tiny-tied":     # no expert, and the head reads the whole table at every step
        assert weight_bytes_touched(model, batch_size) == everything


def test_cache_bytes_read_is_rows_times_bytes_per_token():
    config = preset("custom-llm-973m")
    assert cache_bytes_read(config, 64, 1024, 2) == 64 * 1024 * 576 * 30 * 2


def test_decode_steps_are_those_of_the_whole_batch_after_another():
    # (end time, tokens, forward s): a prefill of 24 tokens, then decode steps of 3, a step after a finished one
    steps = [(0.0, 24, 0.3), (0.5, 3, 0.01), (0.6, 3, 0.02), (0.8, 3, 0.03), (0.9, 2, 0.04), (1.0, 3, 0.05),
             (1.3, 3, 0.06)]
    timed = decode_step_seconds(steps, 3)
    assert [d for d, _ in timed] == pytest.approx([0.1, 0.2, 0.3])
    assert [f for _, f in timed] == [0.02, 0.03, 0.06]          # each step's own forward
    assert decode_step_seconds(steps, 4) == []


# ---- the commands ------------------------------------------------------------------------------------
def test_bench_engine_writes_consistent_results_and_records_them(model_dir, tmp_path):
    out = tmp_path / "engine.json"
    run_bench(tmp_path, "engine", "--model", str(model_dir), "--tokenizer", str(tokenizer_dir()),
              "--batch-sizes", "1,3", "--context-len", "20", "--output-len", "6", "--kv-cache-memory", "0.02",
              "--threads", "1", "--prefill-lens", "9,40", "--out", str(out), "--record")
    result = json.loads(out.read_text())
    assert result["command"].startswith("customllm bench engine --model") and result["threads"] == 1
    assert [row["batch_size"] for row in result["results"]] == [1, 3]
    for row in result["results"]:
        assert row["steps_measured"] >= 1
        step_s = row["median_step_ms"] / 1e3
        assert row["decode_tokens_per_s"] == pytest.approx(row["batch_size"] / step_s)
        floor_s = row["bytes_per_step"] / (result["copy_bandwidth_gb_s"] * 1e9)
        assert row["floor_step_ms"] == pytest.approx(floor_s * 1e3)
        assert row["fraction_of_bandwidth_floor"] == pytest.approx(floor_s / step_s)
        assert 0 < row["median_forward_ms"] and 0 < row["median_host_ms"] < row["median_step_ms"]
        assert row["host_us_per_seq"] == pytest.approx(row["median_host_ms"] * 1e3 / row["batch_size"])
    assert [row["prompt_tokens"] for row in result["prefill"]] == [9, 40]
    for row in result["prefill"]:
        assert row["prefill_tokens_per_s"] == pytest.approx(row["prompt_tokens"] / row["time_to_first_token_ms"] * 1e3)
    table = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "| prompt tokens | time to first token ms | prefill tok/s |" in table and "| 40 | " in table
    assert "### bench engine — " in table and "`customllm bench engine --model" in table
    assert "| 1 | " in table and "| 3 | " in table and "| host ms | host µs/seq |" in table


def test_bench_engine_with_a_json_schema_runs_both_modes_in_one_sitting(model_dir, tmp_path):
    out = tmp_path / "engine.json"
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "array", "minItems": 30, "items": {"type": "integer", "minimum": 0,
                                                                             "maximum": 9}}))
    run_bench(tmp_path, "engine", "--model", str(model_dir), "--tokenizer", str(tokenizer_dir()),
              "--batch-sizes", "1,2", "--context-len", "8", "--output-len", "8", "--kv-cache-memory", "0.02",
              "--threads", "1", "--json-schema", str(schema), "--out", str(out), "--record")
    rows = json.loads(out.read_text())["results"]
    assert [(r["batch_size"], r["json_schema"]) for r in rows] == [(1, False), (1, True), (2, False), (2, True)]
    assert all(r["steps_measured"] >= 2 for r in rows)        # two runs of each mode pooled
    table = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "| 2 (json schema) | " in table and "- batch 2: json schema / unconstrained decode tok/s = " in table


def test_bench_structured_validates_what_it_generates(model_dir, tmp_path):
    assert cap_strings({"anyOf": [{"type": "string"}, {"type": "string", "enum": ["a"]},
                                  {"type": "string", "pattern": "^a$"}]}, 5) == {
        "anyOf": [{"type": "string", "maxLength": 5}, {"type": "string", "enum": ["a"]},
                  {"type": "string", "pattern": "^a$"}]}
    out = tmp_path / "structured.json"
    (tmp_path / "docs").mkdir()
    result = subprocess.run([sys.executable, "-m", "server.cli", "bench", "structured", "--model", str(model_dir),
                             "--tokenizer", str(tokenizer_dir()), "--samples", "1", "--compile-rounds", "2",
                             "--max-tokens", "150", "--max-string-length", "12", "--out", str(out), "--record"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), result.stderr[-3000:]          # 1: not every answer was valid
    figures = json.loads(out.read_text())
    assert figures["total"] == 10 and figures["compile"]["p50_ms"] > 0
    assert result.returncode == (figures["valid"] != 10)
    for answer in figures["answers"]:           # the random model may be cut by max_tokens, never invalid
        assert answer["valid"] or answer["finish_reason"] == "length", answer
    assert "valid (parses and validates against its schema)" in (tmp_path / "docs" / "benchmarks.md").read_text()


def test_bench_serve_measures_levels_and_sessions_and_records_them(model_dir, tmp_path):
    out = tmp_path / "serve.json"
    engine = EngineConfig(kv_cache_memory_gib=TEST_KV_CACHE_GIB, block_size=16)
    with InProcessServer(model_dir, engine_config=engine) as server:
        run_bench(tmp_path, "serve", "--url", server.url, "--concurrency", "1,3", "--num-prompts", "4",
                  "--input-len", "8", "--output-len", "5", "--session-turns", "2", "--no-warmup", "--out", str(out),
                  "--record")
        server.settle()
        assert server.engine.num_sessions == 0          # the benchmark's sessions were deleted
    [ours] = json.loads(out.read_text())["servers"]
    assert ours["label"] == "customllm" and ours["ours"] and ours["command"] is None
    [run] = ours["rounds"]
    assert [level["concurrency"] for level in run["levels"]] == [1, 3] and run["ttft"] == []
    for level in run["levels"]:
        assert level["errors"] == 0 and level["num_prompts"] == 4
        assert level["output_tokens_per_s"] == pytest.approx(4 * 5 / level["duration_s"])
        assert level["decode_tokens_per_s"] == pytest.approx(level["concurrency"] / level["tpot_s"]["p50"])
        assert 0 < level["ttft_s"]["p50"] <= level["e2e_s"]["p50"]
    assert ours["summary"]["levels"]["3"]["output_tokens_per_s"] == run["levels"][1]["output_tokens_per_s"]
    turns = ours["sessions"]
    assert turns["1"]["cached_tokens"] == 0 and turns["2"]["cached_tokens"] > 0
    table = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "| customllm | 1 | " in table and "| **customllm** | median | " in table
    assert "- customllm session turn 2: TTFT" in table


def test_bench_fairness_keeps_tenant_a_served_while_b_floods(model_dir, tmp_path):
    engine = EngineConfig(kv_cache_memory_gib=0.02, max_num_seqs=4, max_waiting_requests=32)
    with InProcessServer(model_dir, api=ApiConfig(api_keys=("key-a", "key-b")), engine_config=engine) as server:
        result = run_bench(tmp_path, "fairness", "--url", server.url, "--key-a", "key-a", "--key-b", "key-b",
                           "--requests", "6", "--max-tokens", "4", "--flood-concurrency", "6",
                           "--flood-prompts", "8", "--flood-max-tokens", "8", "--out", str(tmp_path / "f.json"),
                           "--record")
        summary = json.loads((tmp_path / "f.json").read_text())
    assert summary["alone"]["success_rate"] == 1.0 and summary["flooded"]["success_rate"] == 1.0
    for phase in ("alone", "flooded"):
        assert 0 < summary[phase]["first_token_s"]["p50"] <= summary[phase]["latency_s"]["p50"]
    assert sum(summary["flood_responses"].values()) >= 6           # every one of B's loops got answers
    assert "### bench fairness" in (tmp_path / "docs" / "benchmarks.md").read_text()
    assert result.returncode == 0


def test_bench_disk_tier_restarts_its_servers_and_records_both_figures(model_dir, tmp_path):
    out = tmp_path / "disk.json"
    (tmp_path / "docs").mkdir()
    serve = f"--model {model_dir} --tokenizer {tokenizer_dir()} --kv-cache-memory 0.02"
    result = subprocess.run([sys.executable, "-m", "server.cli", "bench", "disk-tier", "--serve-args", serve,
                             "--sessions", "2", "--prompt-tokens", "120", "--output-len", "6", "--streams", "2",
                             "--requests", "3", "--input-len", "40", "--decode-output-len", "6", "--rounds", "1",
                             "--out", str(out), "--record"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    restart = report["restart"]
    for row in restart["sessions"]:
        assert row["same_answer"] and row["cold_cached_tokens"] == 0 and row["blocks_on_disk_before_kill"] > 0
        assert row["cached_tokens"] >= row["turn1_prompt_tokens"] // 16 * 16 > 0
        assert abs(row["turn1_prompt_tokens"] - 120) <= 20 < row["turn2_prompt_tokens"] - row["turn1_prompt_tokens"]
    assert restart["ratio"] == pytest.approx(restart["ttft_warm_s"] / restart["ttft_cold_s"])
    runs = report["decode"]["runs"]
    assert [run["tier"] for run in runs] == [False, True] and all(run["errors"] == 0 for run in runs)
    assert runs[0]["tier_written_bytes"] == 0 < runs[1]["tier_written_bytes"]
    table = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "### bench disk-tier — " in table and "turn-2 TTFT after SIGKILL + restart" in table
    assert "| restart-1 | " in table and "| 2 | on | " in table and "load average" in table


def test_a_prefill_length_listed_twice_is_a_new_prompt(monkeypatch):
    """`--prefill-lens 2000,2000` times two different prompts (the second is not a prefix-cache hit)."""
    from server.cli.bench import engine_bench
    prompts: list[tuple[int, int]] = []

    async def record(engine, batch_size, context_len, output_len, seed, grammar=None):
        prompts.append((context_len, seed))
    monkeypatch.setattr(engine_bench, "_run_batch", record)
    results = engine_bench.time_to_first_tokens(None, [40, 40, 9])
    assert [r["prompt_tokens"] for r in results] == [40, 40, 9]
    assert [length for length, _ in prompts] == [40, 40, 9]
    assert len({seed for _, seed in prompts}) == 3
