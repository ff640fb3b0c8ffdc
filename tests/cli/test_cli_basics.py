"""What a new user types first: the version, the presets, help that states each default once, and a
flag that does not apply refused rather than ignored. The parsers and what they print are run by the
command's `main` in this process (a process of its own would spend seconds importing PyTorch each
time); the refused flag runs `python -m server.cli` as a process, as the serve tests do."""
from __future__ import annotations

import contextlib
import io
import subprocess
import sys

from model.loading.builtin import builtin_model_path
from server.cli.main import main
from tests.api_server import ROOT


def customllm(*args: str) -> subprocess.CompletedProcess:
    """`customllm ARGS` through its `main`: the exit status (argparse's own exits included) and what
    it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def customllm_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_version():
    result = customllm("--version")
    assert result.returncode == 0 and result.stdout.startswith("customllm ")


def test_presets_are_listed_with_their_sizes():
    result = customllm("weights", "presets")
    assert result.returncode == 0
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert set(rows) >= {"custom-llm-973m", "smollm2-135m", "shomsher-llm", "smart-llm", "custom-llm-tiny"}
    assert rows["custom-llm-973m"][2] == "973,122,258" and rows["custom-llm-973m"][-1] == "34,560"


def test_serve_help_states_each_default_once():
    text = customllm("serve", "--help").stdout
    assert "(default: None)" not in text
    flat = " ".join(text.split())
    assert flat.count("(default: 8000)") == 1 and "(default: off) [env CUSTOMLLM_METRICS_AUTH]" in flat
    assert "init" in customllm("weights", "--help").stdout and "create" not in customllm("weights", "--help").stdout


def test_bench_serve_help_documents_url_and_defaults():
    flat = " ".join(customllm("bench", "serve", "--help").stdout.split())
    assert "--url URL the server to measure" in flat and "(default: http://127.0.0.1:8000)" in flat


def test_preset_with_a_gguf_is_refused():
    result = customllm_process("serve", "--model", str(builtin_model_path()), "--preset", "custom-llm-973m")
    assert result.returncode == 2 and "--preset does not apply to a GGUF file" in result.stderr
