"""`customllm bench spec`: its flags and its record (kept apart from cli.py, which holds the others)."""
from __future__ import annotations

import argparse
import logging
import sys
import time


def add_spec_parser(kinds) -> None:
    spec = kinds.add_parser("spec", help="prompt-lookup speculative decoding on vs off on code edits and summaries "
                            "(greedy, same sitting, interleaved)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    spec.add_argument("--model", default=None, help="checkpoint or .gguf (default: the built-in model)")
    spec.add_argument("--tokenizer", default=None, help="tokenizer file (default: the checkpoint's own)")
    spec.add_argument("--dtype", default="auto", help="as `serve --dtype`")
    spec.add_argument("--num-speculative-tokens", type=int, default=3, help="as `serve --num-speculative-tokens`")
    spec.add_argument("--prompt-lookup-max", type=int, default=3, help="as `serve --prompt-lookup-max`")
    spec.add_argument("--prompt-lookup-min", type=int, default=1, help="as `serve --prompt-lookup-min`")
    spec.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each answer")
    spec.add_argument("--rounds", type=int, default=2, help="times each prompt is answered in each mode")
    spec.add_argument("--concurrency", type=int, default=1, help="prompts answered at once")
    spec.add_argument("--kinds", default="code,summary", help="comma list of the prompt kinds to run")
    spec.add_argument("--out", default=None, help="JSON result file")
    spec.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    spec.set_defaults(func=run_spec)


def run_spec(args) -> int:
    from server.cli.bench.cli import _record, _write, machine_description
    from server.cli.bench.spec_bench import bench_spec
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kinds = tuple(k for k in args.kinds.split(",") if k)
    result = bench_spec(args.model, args.tokenizer, args.dtype, args.num_speculative_tokens, args.prompt_lookup_max,
                        args.prompt_lookup_min, args.max_tokens, args.rounds, args.concurrency, kinds)
    result["machine"] = machine_description()
    result["command"] = "customllm " + " ".join(sys.argv[1:])
    _write(result, args.out)
    if args.record:
        off, on = result["off"], result["on"]
        lines = [f"### bench spec — {time.strftime('%Y-%m-%d')} — {result['machine']}",
                 f"`{result['command']}` — {result['model']}, {len(result['prompts'])} prompts × {result['rounds']} "
                 f"rounds per mode, concurrency {result['concurrency']}, greedy, max_tokens {result['max_tokens']}",
                 "", "| mode | decode tok/s per stream | end-to-end tok/s per stream | "
                 + " | ".join(f"{k} decode tok/s" for k in kinds) + " |",
                 "|---|---|---|" + "---|" * len(kinds)]
        for label, row in (("off", off), (f"on (K={result['num_speculative_tokens']})", on)):
            lines.append(f"| {label} | {row['decode_tokens_per_s']:.1f} | {row['e2e_tokens_per_s']:.1f} | "
                         + " | ".join(f"{row['per_kind_decode_tokens_per_s'][k]:.1f}" for k in kinds) + " |")
        lines.append(f"- on / off: decode {result['speedup_decode']:.2f}×, end-to-end {result['speedup_e2e']:.2f}×; "
                     f"acceptance rate {result['acceptance_rate']:.2f}, mean accepted length "
                     f"{result['mean_accepted_length']:.2f} tokens per verifying step ({result['verifications']} "
                     f"verifications); identical greedy answers {result['identical_answers']}/{result['answers']}; "
                     f"one lookup {result['lookup_us']['median']:.0f} µs median, {result['lookup_us']['max']:.0f} µs max "
                     f"(histories up to {result['lookup_us']['history_tokens']} tokens)")
        _record(lines)
    return 0
