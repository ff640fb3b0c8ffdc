"""`customllm serve`: flags and CUSTOMLLM_* environment variables → ServerConfig (the one place
configuration is parsed), engine start-up with progress logs, uvicorn, graceful SIGTERM drain."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from server.config import KV_CACHE_DTYPES, QUANTIZATIONS, ApiConfig, EngineConfig, ModelLoadConfig, ServerConfig

log = logging.getLogger("customllm.serve")
ENV_PREFIX = "CUSTOMLLM_"
MAX_SPECULATIVE_TOKENS = 32
MIN_CPUS_FOR_ENGINE_PROCESS = 4
# the fair step's least cap on a CPU: this project's 2-core machine decodes the built-in model in 15 ms
# at 1 row, 21 ms at 4 and 39 ms at 8 (docs/benchmarks.md, "Tenant fairness")
CPU_FAIR_STEP_TOKENS = 4


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _add(parser, flag: str, help_text: str, type_=str, default=None, **kwargs):
    """A flag whose default comes from CUSTOMLLM_<FLAG> when set. Its help ends with the default
    (unless the text already says it) and the variable's name, each once."""
    env = os.environ.get(_env_name(flag))
    if env is not None:
        if type_ is bool:
            default = env.strip().lower() in ("1", "true", "yes", "on")
        else:
            try:
                default = type_(env)
            except ValueError:
                raise SystemExit(f"customllm: error: {_env_name(flag)}={env!r} is not a valid {type_.__name__}")
    if type_ is bool:
        action = parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=bool(default), **kwargs)
        shown = "on" if default else "off"
    else:
        action = parser.add_argument(flag, type=type_, default=default, **kwargs)
        shown = default
    suffix = f" (default: {shown})" if shown is not None and "default" not in help_text else ""
    action.help = f"{help_text}{suffix} [env {_env_name(flag)}]"


def add_parser(subparsers) -> None:
    defaults_engine, defaults_api = EngineConfig(), ApiConfig()
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    m = p.add_argument_group("model")
    _add(m, "--model", "checkpoint file or directory, or .gguf (default: built-in SmolLM2-135M-Instruct)")
    _add(m, "--preset", "architecture preset of a checkpoint without a config (`customllm weights presets` lists "
         "them), e.g. custom-llm-973m; a GGUF file carries its own")
    _add(m, "--tokenizer", "tokenizer.json, directory holding one, or .gguf")
    _add(m, "--byte-level-decoder", "SmartLLM's BPE tokenizer file has no decoder, so answers keep byte "
         "symbols such as Ġ as the seed's do; this adds a ByteLevel decoder for readable text", bool, False)
    _add(m, "--chat-template", "jinja chat template file overriding the model's")
    _add(m, "--served-model-name", "model id reported by the API")
    _add(m, "--device", "auto, cpu, cuda or cuda:N", default="auto")
    _add(m, "--dtype", "auto (bfloat16 on CUDA; on a CPU float32 activations with each weight in the format "
         "measured fastest on this machine: float32, bfloat16 or a GGUF's int4/int8), float32 (exact), bfloat16, "
         "float16, or mixed (CPU: float16 for 1-2 token steps, bfloat16 for larger)", default="auto")
    _add(m, "--quantization", "weights held quantized on a CPU: auto (a GGUF's own Q4_0/Q4_1 as int4, Q8_0 and "
         "others requantized, when --dtype is auto; float checkpoints stay float), none (dequantized to --dtype), "
         "int8 (per output row) or int4 (groups of 32), quantizing float checkpoints at load", default="auto")
    _add(m, "--decode-attention", "attention of decode steps: auto (the family's Triton paged kernel on CUDA when "
         "triton is installed, on the CPU a C kernel that reads the paged cache in place when a C compiler is "
         "there: MLA for CustomLLM, grouped-query for Llama and SmartLLM; ShomsherLLM has none), "
         "torch (gather each context), triton, or cpu", default="auto")
    _add(m, "--kv-cache-dtype", "what the KV cache holds: auto (on a CPU float16 with --dtype auto or --quantization, "
         "the exact float32 with --dtype float32; elsewhere the activations' dtype), or on a CPU float32, bfloat16 or "
         "float16 (16 bits: half the cache's bytes, so twice the tokens in --kv-cache-memory and half the bytes a "
         "decode step reads from long contexts; keys and values rounded, as llama.cpp's default float16 cache)",
         default="auto")
    _add(m, "--cuda-graphs", "on CUDA, replay decode steps from CUDA graphs (models whose decode attention runs in "
         "the Triton kernel; every family but ShomsherLLM)", bool, True)
    _add(m, "--compile-decode", "on the CPU, run decode steps through torch.compile (inductor), compiled at start-up "
         "for each batch-size bucket up to --max-num-seqs (minutes on 2 cores; later starts read inductor's cache); "
         "models whose decode attention runs in the CPU kernel and whose MoE routes without host syncs (the Llama "
         "family, SmartLLM without routed experts)", bool, False)
    e = p.add_argument_group("engine")
    _add(e, "--engine-process", "run the engine core (model, scheduling, sampling) in a process of its own, the HTTP "
         "process tokenizing, templating, detokenizing and streaming beside it (if the core dies the server exits "
         "non-zero): on, off (one process, the engine loop in its main thread), or auto: on with CUDA or at least "
         f"{MIN_CPUS_FOR_ENGINE_PROCESS} usable CPUs (on two cores the processes' threads contend and one process "
         "is faster: docs/benchmarks.md)", default="auto")
    _add(e, "--overlap-steps", "pipeline decode steps one deep: the host schedules step N+1 and streams step N's "
         "tokens while the forward of step N+1 runs (outputs unchanged): on, off, or auto: on with CUDA (on a CPU "
         "the forward already uses every core: docs/benchmarks.md)", default="auto")
    _add(e, "--adaptive-threads", "on a CPU, lower torch's thread count while other processes keep some of this "
         "process's CPUs busy, and raise it again when they are free (checked every second; one log line per "
         "change): a team of threads that waits for one without a core is slower than fewer threads", bool, True)
    _add(e, "--block-size", "tokens per KV-cache block", int, defaults_engine.block_size)
    _add(e, "--kv-cache-memory", "KV-cache size in GiB (default: 1 on CPU, 85%% of free GPU memory)", float)
    _add(e, "--max-num-seqs", "most sequences in one batch", int, defaults_engine.max_num_seqs)
    _add(e, "--max-num-batched-tokens", "token budget of one step", int, defaults_engine.max_num_batched_tokens)
    _add(e, "--max-waiting-requests", "queue length before 429", int, defaults_engine.max_waiting_requests)
    _add(e, "--max-waiting-per-tenant", "requests one API key may have waiting before its own 429 (default: half "
         "of --max-waiting-requests); waiting requests are served round robin across keys", int,
         defaults_engine.max_waiting_per_tenant)
    _add(e, "--fair-step-tokens", "while requests of two or more API keys are in the engine, a step computes at "
         "most max(N, keys × the lightest key's requests) tokens, shared equally across the keys, so one key's "
         "flood cannot slow another key's few streams to the pace of a full batch: N, 0 (off), or auto: "
         f"{CPU_FAIR_STEP_TOKENS} on a CPU (a step's cost grows with its rows), off with CUDA", default="auto")
    _add(e, "--max-sessions", "most sessions kept", int, defaults_engine.max_sessions)
    _add(e, "--session-ttl", "seconds an idle session keeps its cache", float, defaults_engine.session_idle_ttl_s)
    _add(e, "--max-session-pinned-fraction", "share of the cache sessions may pin", float,
         defaults_engine.max_session_pinned_fraction)
    _add(e, "--kv-disk-dir", "directory of a disk tier for the KV cache: session pins and evicted prefix "
         "blocks are written there behind the engine and restored after a restart, or by another replica "
         "sharing it (default: off)")
    _add(e, "--kv-disk-gib", "size bound of --kv-disk-dir in GiB (least recently used files go first)", float,
         defaults_engine.kv_disk_gib)
    _add(e, "--kv-host-gib", "host-memory tier between the pool and the disk, in GiB (for GPUs; 0 = off)", float,
         defaults_engine.kv_host_gib)
    _add(e, "--grammar-cache-size", "compiled structured-output grammars kept (LRU by schema)", int,
         defaults_engine.grammar_cache_size)
    _add(e, "--grammar-wrap-up", "near the end of max_tokens, steer a constrained answer (JSON schema, regex, "
         "grammar, forced tool call) to its shortest completion so that it ends complete", bool,
         defaults_engine.grammar_wrap_up)
    _add(e, "--num-speculative-tokens", "prompt-lookup speculative decoding: draft tokens taken from the request's "
         "own context and verified in one step, up to this many per step, for requests that set "
         "`speculative_decoding: true` (0 = off: such requests get a 400)", int, defaults_engine.num_speculative_tokens)
    _add(e, "--prompt-lookup-max", "longest n-gram whose earlier occurrence proposes the drafts", int,
         defaults_engine.prompt_lookup_max)
    _add(e, "--prompt-lookup-min", "shortest n-gram whose earlier occurrence proposes the drafts", int,
         defaults_engine.prompt_lookup_min)
    a = p.add_argument_group("http")
    _add(a, "--host", "bind address", default=defaults_api.host)
    _add(a, "--port", "port", int, defaults_api.port)
    a.add_argument("--api-key", action="append", default=None,
                   help=f"accepted API key (repeatable; each key is a tenant) [env {ENV_PREFIX}API_KEY, comma-separated]")
    _add(a, "--api-key-file", "file with one API key per line")
    _add(a, "--metrics-auth", "require an API key for /metrics", bool, False)
    _add(a, "--max-body-bytes", "largest request body", int, defaults_api.max_body_bytes)
    _add(a, "--max-n", "largest n", int, defaults_api.max_n)
    _add(a, "--max-sequences-per-request", "most sequences (prompts × n) one completions call may start", int,
         defaults_api.max_sequences_per_request)
    _add(a, "--max-stop-strings", "most stop strings per request", int, defaults_api.max_stop_strings)
    _add(a, "--max-stop-chars", "longest stop string, in characters", int, defaults_api.max_stop_chars)
    _add(a, "--max-logit-bias", "most logit_bias entries per request", int, defaults_api.max_logit_bias)
    _add(a, "--max-tokens-limit", "largest max_tokens", int, defaults_api.max_tokens_limit)
    _add(a, "--default-max-tokens", "max_tokens when a request gives none (default: 512 for chat, 16 for "
                                    "completions; always within what the context leaves)", int,
         defaults_api.default_max_tokens)
    _add(a, "--shutdown-grace", "seconds running requests get to finish on SIGTERM", float,
         defaults_api.shutdown_grace_s)
    _add(a, "--header-timeout", "seconds a client has to send a request's line and headers (slow or stalled "
         "clients are disconnected)", float, defaults_api.header_timeout_s)
    _add(a, "--grammar-compile-timeout", "seconds a structured-output grammar (JSON schema, regex, grammar, tool "
         "arguments) may take to compile before the request is refused with a 400", float,
         defaults_api.grammar_compile_timeout_s)
    _add(a, "--public-docs", "serve /docs, /redoc and /openapi.json without an API key", bool, defaults_api.public_docs)
    _add(a, "--log-requests", "log one line per HTTP request", bool, defaults_api.log_requests)
    _add(a, "--log-level", "logging level", default="info")
    p.set_defaults(func=run)


def api_keys_from(args) -> tuple[str, ...]:
    keys = list(args.api_key or [])
    env = os.environ.get(ENV_PREFIX + "API_KEY")
    if not keys and env:
        keys = [k for k in env.split(",")]
    if args.api_key_file:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise ValueError(f"--api-key-file {path} does not exist")
        keys += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    keys = [k.strip() for k in keys if k.strip()]
    return tuple(dict.fromkeys(keys))


def _check(args) -> None:
    """ValueError for flag values no server can run with (the engine checks its own in depth)."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in [1, 65535]")
    if args.preset and args.model and args.model.endswith(".gguf"):
        raise ValueError("--preset does not apply to a GGUF file, which carries its own configuration")
    for flag in ("engine_process", "overlap_steps"):
        if getattr(args, flag) not in ("auto", "on", "off"):
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: choose auto, on or off")
    if args.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {args.kv_cache_dtype!r}: choose one of {', '.join(KV_CACHE_DTYPES)}")
    if args.quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization {args.quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if args.header_timeout <= 0:
        raise ValueError("--header-timeout must be positive")
    for flag, minimum in (("max_body_bytes", 1), ("max_n", 1), ("max_sequences_per_request", 1),
                          ("max_stop_strings", 0), ("max_stop_chars", 1), ("max_logit_bias", 0), ("max_tokens_limit", 1),
                          ("block_size", 1), ("max_num_seqs", 1), ("max_num_batched_tokens", 1),
                          ("max_waiting_requests", 0), ("max_sessions", 0), ("shutdown_grace", 0),
                          ("grammar_cache_size", 1)):
        if getattr(args, flag) < minimum:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {minimum}")
    if args.max_waiting_per_tenant is not None and args.max_waiting_per_tenant < 1:
        raise ValueError("--max-waiting-per-tenant must be at least 1")
    if args.default_max_tokens is not None and args.default_max_tokens < 1:
        raise ValueError("--default-max-tokens must be at least 1")
    if args.session_ttl <= 0:
        raise ValueError("--session-ttl must be positive")
    if args.kv_disk_gib <= 0 or args.kv_host_gib < 0:
        raise ValueError("--kv-disk-gib must be positive and --kv-host-gib at least 0")
    if args.grammar_compile_timeout <= 0:
        raise ValueError("--grammar-compile-timeout must be positive")
    if not 0 <= args.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"--num-speculative-tokens must be in [0, {MAX_SPECULATIVE_TOKENS}]")
    if not 1 <= args.prompt_lookup_min <= args.prompt_lookup_max:
        raise ValueError("--prompt-lookup-min must be at least 1 and at most --prompt-lookup-max")


def config_from_args(args) -> ServerConfig:
    _check(args)
    return ServerConfig(
        model=ModelLoadConfig(model=args.model, preset=args.preset, tokenizer=args.tokenizer,
                              byte_level_decoder=args.byte_level_decoder,
                              chat_template=args.chat_template, device=args.device, dtype=args.dtype,
                              quantization=args.quantization,
                              served_model_name=args.served_model_name, decode_attention=args.decode_attention,
                              cuda_graphs=args.cuda_graphs, compile_decode=args.compile_decode,
                              kv_cache_dtype=args.kv_cache_dtype),
        engine=EngineConfig(block_size=args.block_size, kv_cache_memory_gib=args.kv_cache_memory,
                            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                            max_waiting_requests=args.max_waiting_requests,
                            max_waiting_per_tenant=args.max_waiting_per_tenant, max_sessions=args.max_sessions,
                            session_idle_ttl_s=args.session_ttl,
                            max_session_pinned_fraction=args.max_session_pinned_fraction,
                            kv_disk_dir=args.kv_disk_dir or None, kv_disk_gib=args.kv_disk_gib,
                            kv_host_gib=args.kv_host_gib, grammar_cache_size=args.grammar_cache_size,
                            grammar_wrap_up=args.grammar_wrap_up,
                            num_speculative_tokens=args.num_speculative_tokens,
                            prompt_lookup_max=args.prompt_lookup_max, prompt_lookup_min=args.prompt_lookup_min,
                            overlap_steps=overlap_steps_wanted(args.overlap_steps, args.device),
                            fair_step_tokens=fair_step_tokens_wanted(args.fair_step_tokens, args.device),
                            adaptive_threads=args.adaptive_threads),
        api=ApiConfig(host=args.host, port=args.port, api_keys=api_keys_from(args),
                      metrics_require_auth=args.metrics_auth, max_body_bytes=args.max_body_bytes, max_n=args.max_n,
                      max_sequences_per_request=args.max_sequences_per_request,
                      max_stop_strings=args.max_stop_strings, max_stop_chars=args.max_stop_chars,
                      max_logit_bias=args.max_logit_bias, max_tokens_limit=args.max_tokens_limit,
                      default_max_tokens=args.default_max_tokens, shutdown_grace_s=args.shutdown_grace,
                      header_timeout_s=args.header_timeout, public_docs=args.public_docs,
                      grammar_compile_timeout_s=args.grammar_compile_timeout,
                      log_requests=args.log_requests))


class _StopLoading(BaseException):
    """A signal while the model loads: nothing runs yet, so stop at once (BaseException, so that no
    `except Exception` in the loading code swallows it)."""


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def engine_process_wanted(choice: str, device_name: str) -> bool:
    """`--engine-process`: auto is on with CUDA or MIN_CPUS_FOR_ENGINE_PROCESS usable CPUs."""
    if choice != "auto":
        return choice == "on"
    from server.executor.build import resolve_device
    from server.executor.threads import available_cpus
    return resolve_device(device_name).type == "cuda" or available_cpus() >= MIN_CPUS_FOR_ENGINE_PROCESS


def fair_step_tokens_wanted(choice: str, device_name: str) -> int:
    """`--fair-step-tokens`: a number, or auto (CPU_FAIR_STEP_TOKENS on a CPU, 0 = off with CUDA)."""
    if choice != "auto":
        try:
            tokens = int(choice)
        except ValueError:
            raise ValueError(f"--fair-step-tokens {choice!r}: a number of tokens, 0 (off) or auto") from None
        if tokens < 0:
            raise ValueError("--fair-step-tokens must be at least 0")
        return tokens
    from server.executor.build import resolve_device
    return 0 if resolve_device(device_name).type == "cuda" else CPU_FAIR_STEP_TOKENS


def overlap_steps_wanted(choice: str, device_name: str) -> bool:
    """`--overlap-steps`: auto is on with CUDA."""
    if choice != "auto":
        return choice == "on"
    from server.executor.build import resolve_device
    return resolve_device(device_name).type == "cuda"


def _after_engine_process(engine, exit_code, state, server, http, grace: float) -> int:
    """The engine-core process has exited: after a drain, wait for the shutdown to finish and exit 0;
    otherwise it died, and so does the server (non-zero: an orchestrator restarts it) once the
    in-flight requests have had their error events."""
    if engine.stopping:
        if state.get("shutdown") is not None:
            state["shutdown"].join(timeout=grace + 30)
        engine.stop()
        log.info("stopped")
        return 1 if state["http_failed"] else 0
    log.error("the engine core process died (exit code %s): exiting", exit_code)
    state["engine_died"] = True
    server.should_exit = True
    http.join(timeout=10)
    engine.stop()
    return 1


def run(args) -> int:
    """HTTP first (so /health answers 503 while the model loads), then the model, then the engine
    loop in the main thread until a signal drains it; with --engine-process the model and the loop
    are in the engine-core process, which the main thread watches."""
    import uvicorn

    from server.api.app import create_app
    from server.api.http_protocol import http_protocol
    from server.api.metrics import Metrics
    from server.executor.build import build_engine, freeze_loaded_objects

    setup_logging(args.log_level)
    config = config_from_args(args)
    in_own_process = engine_process_wanted(args.engine_process, config.model.device)
    from server.executor.threads import configure_threads
    configure_threads()
    api = config.api
    metrics = Metrics()
    app = create_app(None, api, metrics)
    grace = api.shutdown_grace_s
    # uvicorn serves from a secondary thread (so it installs no signal handlers); the engine loop owns
    # the main thread (see Engine.run_forever), and signals are handled here.
    server = uvicorn.Server(uvicorn.Config(app, host=api.host, port=api.port, log_level="warning", log_config=None,
                                           http=http_protocol(api.header_timeout_s),
                                           access_log=False, timeout_graceful_shutdown=int(grace) + 5))
    http = threading.Thread(target=server.run, name="http", daemon=True)
    state = {"engine": None, "signalled": False, "http_failed": False, "engine_died": False}

    def shut_down() -> None:
        """Stop accepting; running requests get `grace` seconds, the rest are aborted (finish_reason
        "abort") so their responses end; then the engine loop stops and the process exits 0."""
        engine = state["engine"]
        server.should_exit = True
        engine.drain(grace)
        http.join(timeout=grace + 10)
        engine.stop()

    def on_signal(sig, frame) -> None:
        if state["signalled"]:
            log.warning("second signal: exiting now")
            os._exit(1)
        state["signalled"] = True
        if state["engine"] is None:
            log.info("signal %s while loading: stopping", signal.Signals(sig).name)
            if state.get("spawning"):
                # not in the middle of handing the engine-core child its start-up data (it would die
                # reading half of it, with a traceback): raised once the spawn is done
                state["stop_after_spawn"] = True
                return
            raise _StopLoading
        log.info("signal %s: draining (grace %.0f s)", signal.Signals(sig).name, grace)
        state["shutdown"] = threading.Thread(target=shut_down, name="shutdown", daemon=True)
        state["shutdown"].start()

    # handlers first: a signal may come as soon as /health answers
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        http.start()
        while not server.started and http.is_alive():
            http.join(timeout=0.05)
        if not server.started:
            log.error("cannot serve on %s:%d (is the port in use?)", api.host, api.port)
            return 1
        log.info("listening on http://%s:%d (auth %s); /health answers 503 until the model is loaded", api.host,
                 api.port, "on" if api.api_keys else "off")
        if in_own_process:
            from server.engine.core_client import EngineCoreClient
            engine = EngineCoreClient(config, observer=metrics, log_level=args.log_level)
            state["loading"] = engine
            state["spawning"] = True
            engine.start()
            state["spawning"] = False
            if state.get("stop_after_spawn"):
                raise _StopLoading
            engine.wait_ready()
        else:
            engine = build_engine(config, observer=metrics, start=False)
            freeze_loaded_objects()
        metrics.bind_engine(engine)
        state["engine"] = engine
    except _StopLoading:
        if state.get("loading") is not None:
            state["loading"].stop()
        server.should_exit = True
        http.join(timeout=10)
        log.info("stopped")
        return 0
    except RuntimeError as exc:
        if not in_own_process:
            raise
        log.error("the engine core could not start: %s", exc)
        state["loading"].stop()
        server.should_exit = True
        http.join(timeout=10)
        return 1
    app.state.engine = engine

    def watch_http() -> None:
        http.join()
        if not state["signalled"] and not state["engine_died"]:
            log.error("the HTTP server stopped unexpectedly")
            state["http_failed"] = True
            engine.stop()
    threading.Thread(target=watch_http, name="http-watch", daemon=True).start()
    log.info("serving %s on http://%s:%d", engine.model_name, api.host, api.port)
    exit_code = engine.run_forever()
    if in_own_process:
        return _after_engine_process(engine, exit_code, state, server, http, grace)
    if not engine.stopping:       # the loop died: keep answering /health with 503 until told to stop
        log.error("the engine loop stopped; /health answers 503 until the server is stopped")
        http.join()
    log.info("stopped")
    return 1 if state["http_failed"] else 0
