"""`customllm bench gpu` (the GPU check in one command): its whole path in `--quick` mode on the CPU
(every phase in its own process, the JSON, the docs section), and the pieces a GPU run depends on
that a CPU can check: the pytest counts, the budget that stops a phase, the datasheet bandwidths,
the random checkpoints made on the device and the tokenizer that covers their vocabulary, and the
stand-in for the built-in model. No figure is asserted: only that they are there and hang together."""
from __future__ import annotations

import json
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

from model.config import preset
from model.loading.init_weights import random_model
from model.text.tokenizer import load_tokenizer
from server.cli.bench.gpu_bench import (ROOT, gpu_test_files, nominal_bandwidth_tb_s, run_child, section_lines,
                                        gpu_tests_phase)
from server.cli.bench.gpu_phases import BUILTIN_PRESET, random_weights_on_device, write_padded_tokenizer
from server.engine.detokenizer import byte_view, make_detokenizer
from tests.cli.test_bench import run_bench
from tests.default_model import default_gguf_path


def test_quick_check_runs_every_phase_and_writes_one_json_and_a_section(tmp_path):
    out = tmp_path / "gpu.json"
    marked = tmp_path / "test_marked.py"     # a trivially small selection (`gpu_tests_phase` has its own test)
    marked.write_text("import pytest\n\n@pytest.mark.gpu\ndef test_marked(): pass\n\ndef test_unmarked(): pass\n")
    started = time.monotonic()
    run_bench(tmp_path, "gpu", "--device", "cpu", "--quick", "--test-files", str(marked), "--out", str(out), "--record")
    result = json.loads(out.read_text())
    assert time.monotonic() - started < result["budget_s"]
    assert result["ok"] and result["quick"] and result["device"] == "cpu" and result["device_name"] == "cpu"
    assert result["command"].startswith("customllm bench gpu --device cpu --quick")
    phases = result["phases"]
    assert [phases[name]["status"] for name in ("tests", "decode", "peers")] == ["ok", "ok", "ok"]
    for phase in phases.values():
        assert 0 < phase["wall_s"] <= phase["budget_s"]

    tests = phases["tests"]
    assert tests["files"] == [str(marked)]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (1, 0, 0, 0)

    decode = phases["decode"]
    assert decode["preset"] == "custom-llm-tiny" and decode["context_len"] == 16 and decode["output_len"] == 8
    assert result["bandwidth"]["source"] == "copy measured on cpu"
    assert result["bandwidth"]["tb_s"] == pytest.approx(decode["copy_bandwidth_gb_s"] / 1e3)
    assert [row["batch_size"] for row in decode["rows"]] == [1, 2]
    for row in decode["rows"]:
        assert row["decode_tokens_per_s"] > 0 and row["median_step_ms"] > 0 and row["bytes_per_step"] > 0
        roofline_s = row["bytes_per_step"] / (result["bandwidth"]["tb_s"] * 1e12)
        assert row["roofline_step_ms"] == pytest.approx(roofline_s * 1e3)
        assert row["roofline_fraction"] == pytest.approx(roofline_s * 1e3 / row["median_step_ms"])
        assert row["target_tokens_per_s"] is None and row["meets_target"] is None   # targets are the 973M's

    peers = phases["peers"]
    assert peers["model_source"] == "random weights, preset llama-tiny"
    assert 1 <= len(peers["engine_runs"]) <= 2
    assert [row["concurrency"] for row in peers["rows"]] == [1, 2]
    for row in peers["rows"]:
        assert row["transformers_generate_tokens_per_s"] > 0 and min(row["ours_runs_tokens_per_s"]) > 0
        assert len(row["ours_runs_tokens_per_s"]) == len(peers["engine_runs"])
        assert row["ours_tokens_per_s"] == pytest.approx(sum(row["ours_runs_tokens_per_s"]) / len(peers["engine_runs"]))
        assert row["ours_over_transformers"] == pytest.approx(row["ours_tokens_per_s"]
                                                              / row["transformers_generate_tokens_per_s"])
        assert "transformers_generate_batch_tokens_per_s" not in row       # not in quick mode

    section = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "\n".join(section_lines(result)) in section        # what --from-json renders from the JSON
    assert section.count("\n| 1 | ") == 2 and section.count("\n| 2 | ") == 2
    assert "(`pytest -m gpu`, 1 files): 1 passed, 0 failed, 0 errors, 0 skipped" in section


def test_the_tests_phase_reports_what_pytest_counted(tmp_path):
    tests = tmp_path / "test_marked.py"
    tests.write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        def test_passes(): pass

        @pytest.mark.gpu
        def test_fails(): assert False

        @pytest.mark.gpu
        def test_skips(): pytest.skip("no")

        def test_unmarked_is_deselected(): assert False
    """))
    args = SimpleNamespace(test_files=str(tests))
    phase = gpu_tests_phase(args, 60, tmp_path)
    assert phase["status"] == "tests failed" and phase["files"] == [str(tests)]
    assert (phase["passed"], phase["failed"], phase["skipped"], phase["errors"]) == (1, 1, 1, 0)
    assert any("test_fails" in line for line in phase["log_tail"])


def test_a_phase_past_its_budget_is_stopped():
    started = time.monotonic()
    status, seconds, tail = run_child([sys.executable, "-c", "import threading; print('waiting', flush=True); "
                                       "threading.Event().wait()"], budget_s=3)
    assert status == "over budget" and tail == ["waiting"]
    assert 3 <= seconds < 30 and time.monotonic() - started < 30


def test_the_default_selection_is_every_file_with_a_gpu_mark():
    files = gpu_test_files()
    assert "tests/executor/test_decode_graphs.py" in files and "tests/model/kernels/test_triton_mla_decode.py" in files
    assert all((ROOT / f).read_text().count("pytest.mark.gpu") for f in files)
    assert "tests/cli/test_bench.py" not in files


@pytest.mark.parametrize("name, tb_s", [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H200", 4.8),
                                        ("NVIDIA H200 NVL", 4.8), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9),
                                        ("NVIDIA GH200 480GB", None), ("NVIDIA H20", None),
                                        ("NVIDIA A100-SXM4-80GB", None)])
def test_datasheet_bandwidth_by_device_name(name, tb_s):
    assert nominal_bandwidth_tb_s(name) == tb_s


def test_random_weights_made_on_the_device_follow_random_model():
    config = preset("custom-llm-tiny")
    ours = dict(random_weights_on_device(config, torch.bfloat16, torch.device("cpu"), seed=3, std=0.05)
                .named_parameters())
    reference = dict(random_model(config, seed=3, std=0.05).named_parameters())
    assert ours.keys() == reference.keys()
    for name, param in ours.items():
        assert param.dtype == torch.bfloat16
        if param.dim() < 2:             # norm scales 1, biases and routing biases 0, exactly
            assert torch.equal(param.float(), reference[name])
        elif param.numel() >= 4096:
            values = param.float()
            assert abs(values.mean().item()) < 0.01 and values.std().item() == pytest.approx(0.05, rel=0.1)


def test_the_padded_tokenizer_detokenizes_every_id_of_the_model(tmp_path):
    trained = write_padded_tokenizer(tmp_path, 2000)
    tokenizer = load_tokenizer(str(tmp_path))
    assert trained == 512 and tokenizer.vocab_size == 2000
    view = byte_view(tokenizer)
    assert view is not None and len(view) == 2000
    detokenizer = make_detokenizer(tokenizer, [], view)
    assert detokenizer.push([1999]) == "<|filler-1999|>"
    assert detokenizer.push([ord("a") - 32]) != ""     # a trained byte token still decodes


def test_the_stand_in_is_the_built_in_model_architecture():
    from gguf import GGUFReader

    from model.loading.gguf_file import config_from_gguf, read_fields
    reader = GGUFReader(str(default_gguf_path()))
    builtin = config_from_gguf(read_fields(reader), {t.name for t in reader.tensors})
    stand_in = preset(BUILTIN_PRESET)
    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
              "tie_word_embeddings", "rope_theta", "rms_norm_eps")
    assert {f: getattr(stand_in, f) for f in fields} == {f: getattr(builtin, f) for f in fields}


def test_a_json_from_a_device_is_recorded_as_its_section(tmp_path):
    """`--from-json FILE --record`: the section of a result brought back from a device machine, with a
    phase that ran out of time, targets met and missed, and a peer figure that failed."""
    result = {
        "date": "2026-12-02", "machine": "Intel Xeon, 16 torch threads, GPU NVIDIA H200, torch 2.11.0+cu130",
        "command": "customllm bench gpu --out /tmp/out/gpu-check.json", "wall_s": 431.0, "budget_s": 450.0,
        "device_name": "NVIDIA H200", "bandwidth": {"tb_s": 4.8, "source": "datasheet, NVIDIA H200"},
        "phases": {
            "tests": {"status": "over budget", "wall_s": 100.0, "budget_s": 100.0, "files": ["a", "b"]},
            "decode": {"status": "ok", "preset": "custom-llm-973m", "dtype": "bfloat16", "context_len": 1024,
                       "output_len": 64, "copy_bandwidth_gb_s": 4300.0, "rows": [
                           {"batch_size": 1, "decode_tokens_per_s": 1200.0, "median_step_ms": 0.83,
                            "median_host_ms": 0.2, "bytes_per_step": 0.85e9, "roofline_step_ms": 0.18,
                            "roofline_fraction": 0.21, "target_tokens_per_s": 1000, "meets_target": True},
                           {"batch_size": 256, "decode_tokens_per_s": 30000.0, "median_step_ms": 8.5,
                            "median_host_ms": 1.0, "bytes_per_step": 10.9e9, "roofline_step_ms": 2.28,
                            "roofline_fraction": 0.27, "target_tokens_per_s": 40000, "meets_target": False}]},
            "peers": {"status": "over budget", "partial": True, "model_source": "random weights, preset smollm2-135m",
                      "dtype": "bfloat16", "context_len": 128, "output_len": 64, "engine_runs": [{}], "rows": [
                          {"concurrency": 1, "ours_tokens_per_s": 600.0, "transformers_generate_tokens_per_s": 60.0,
                           "ours_over_transformers": 10.0, "transformers_generate_batch_error": "RuntimeError: x"}]}}}
    path = tmp_path / "gpu-check.json"
    path.write_text(json.dumps(result))
    printed = run_bench(tmp_path, "gpu", "--from-json", str(path), "--record").stdout
    section = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert printed.strip() in section and section.strip().startswith("### bench gpu — 2026-12-02 — Intel Xeon")
    assert "- gpu-marked tests: over budget" in section
    assert "roofline at 4.80 TB/s (datasheet, NVIDIA H200; a copy measured 4300 GB/s)" in section
    assert "| 1 | 1,200 | 0.83 | 0.20 | 0.85 | 0.18 | 0.21 | 1,000 | yes |" in section
    assert "| 256 | 30,000 | 8.50 | 1.00 | 10.90 | 2.28 | 0.27 | 40,000 | **no** |" in section
    assert "one run, before them (**over budget**: what it measured before)" in section
    assert "| 1 | 600.0 | 60.0 | 10.00× | failed (the JSON has why) |" in section
