"""`customllm bench spec` on the tiny model: it runs both modes in one sitting, its greedy answers are
identical with and without speculation, and `--record` appends its table. No figure is asserted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from server.cli.bench.spec_prompts import SPEC_PROMPTS
from tests.api_server import make_tiny_checkpoint, tokenizer_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-spec"), 0, "max_context=1024")


def test_the_prompt_set_has_code_edits_and_summaries():
    kinds = [kind for kind, _, _ in SPEC_PROMPTS]
    assert kinds.count("code") >= 3 and kinds.count("summary") >= 3
    assert len({name for _, name, _ in SPEC_PROMPTS}) == len(SPEC_PROMPTS)


def test_bench_spec_compares_both_modes_and_records_them(model_dir, tmp_path):
    out = tmp_path / "spec.json"
    (tmp_path / "docs").mkdir()
    result = subprocess.run([sys.executable, "-m", "server.cli", "bench", "spec", "--model", str(model_dir),
                             "--tokenizer", str(tokenizer_dir()), "--dtype", "float32", "--max-tokens", "24",
                             "--rounds", "1", "--concurrency", "2", "--kinds", "code", "--out", str(out), "--record"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    code_prompts = sum(kind == "code" for kind, _, _ in SPEC_PROMPTS)
    assert figures["answers"] == code_prompts and figures["identical_answers"] == code_prompts
    for mode in ("off", "on"):
        assert figures[mode]["requests"] == code_prompts and figures[mode]["decode_tokens_per_s"] > 0
    assert 0 <= figures["acceptance_rate"] <= 1 and figures["mean_accepted_length"] >= 1
    assert figures["lookup_us"]["median"] > 0
    assert "| on (K=3) |" in (tmp_path / "docs" / "benchmarks.md").read_text()
