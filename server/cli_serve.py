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

from server.config import ApiConfig, EngineConfig, ModelLoadConfig, ServerConfig

log = logging.getLogger("customllm.serve")
ENV_PREFIX = "CUSTOMLLM_"


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _add(parser, flag: str, help_text: str, type_=str, default=None, **kwargs):
    """A flag whose default comes from CUSTOMLLM_<FLAG> when set."""
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
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=bool(default),
                            help=f"{help_text} [env {_env_name(flag)}]", **kwargs)
    else:
        parser.add_argument(flag, type=type_, default=default, help=f"{help_text} [env {_env_name(flag)}]",
                            **kwargs)


def add_parser(subparsers) -> None:
    defaults_engine, defaults_api = EngineConfig(), ApiConfig()
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    _add(m, "--model", "checkpoint file or directory, or .gguf (default: built-in SmolLM2-135M-Instruct)")
    _add(m, "--preset", "architecture preset, e.g. custom-llm-973m")
    _add(m, "--tokenizer", "tokenizer.json, directory holding one, or .gguf")
    _add(m, "--chat-template", "jinja chat template file overriding the model's")
    _add(m, "--served-model-name", "model id reported by the API")
    _add(m, "--device", "auto, cpu, cuda or cuda:N", default="auto")
    _add(m, "--dtype", "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16, or mixed (CPU: float16 for 1-2 token steps, bfloat16 for larger)", default="auto")
    e = p.add_argument_group("engine")
    _add(e, "--block-size", "tokens per KV-cache block", int, defaults_engine.block_size)
    _add(e, "--kv-cache-memory", "KV-cache size in GiB (default: 1 on CPU, 85%% of free GPU memory)", float)
    _add(e, "--max-num-seqs", "most sequences in one batch", int, defaults_engine.max_num_seqs)
    _add(e, "--max-num-batched-tokens", "token budget of one step", int, defaults_engine.max_num_batched_tokens)
    _add(e, "--max-waiting-requests", "queue length before 429", int, defaults_engine.max_waiting_requests)
    _add(e, "--max-sessions", "most sessions kept", int, defaults_engine.max_sessions)
    _add(e, "--session-ttl", "seconds an idle session keeps its cache", float, defaults_engine.session_idle_ttl_s)
    _add(e, "--max-session-pinned-fraction", "share of the cache sessions may pin", float,
         defaults_engine.max_session_pinned_fraction)
    a = p.add_argument_group("http")
    _add(a, "--host", "bind address", default=defaults_api.host)
    _add(a, "--port", "port", int, defaults_api.port)
    p.add_argument("--api-key", action="append", default=None,
                   help=f"accepted API key (repeatable; each key is a tenant) [env {ENV_PREFIX}API_KEY, comma-separated]")
    _add(a, "--api-key-file", "file with one API key per line")
    _add(a, "--metrics-auth", "require an API key for /metrics", bool, False)
    _add(a, "--max-body-bytes", "largest request body", int, defaults_api.max_body_bytes)
    _add(a, "--max-n", "largest n", int, defaults_api.max_n)
    _add(a, "--max-stop-strings", "most stop strings per request", int, defaults_api.max_stop_strings)
    _add(a, "--max-tokens-limit", "largest max_tokens", int, defaults_api.max_tokens_limit)
    _add(a, "--shutdown-grace", "seconds running requests get to finish on SIGTERM", float,
         defaults_api.shutdown_grace_s)
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


def config_from_args(args) -> ServerConfig:
    return ServerConfig(
        model=ModelLoadConfig(model=args.model, preset=args.preset, tokenizer=args.tokenizer,
                              chat_template=args.chat_template, device=args.device, dtype=args.dtype,
                              served_model_name=args.served_model_name),
        engine=EngineConfig(block_size=args.block_size, kv_cache_memory_gib=args.kv_cache_memory,
                            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                            max_waiting_requests=args.max_waiting_requests, max_sessions=args.max_sessions,
                            session_idle_ttl_s=args.session_ttl,
                            max_session_pinned_fraction=args.max_session_pinned_fraction),
        api=ApiConfig(host=args.host, port=args.port, api_keys=api_keys_from(args),
                      metrics_require_auth=args.metrics_auth, max_body_bytes=args.max_body_bytes, max_n=args.max_n,
                      max_stop_strings=args.max_stop_strings, max_tokens_limit=args.max_tokens_limit,
                      shutdown_grace_s=args.shutdown_grace))


def run(args) -> int:
    import uvicorn

    from server.app import create_app
    from server.metrics import Metrics
    from server.serving import build_engine

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    metrics = Metrics()
    engine = build_engine(config, observer=metrics, start=False)
    metrics.bind_engine(engine)
    app = create_app(engine, config.api, metrics)
    grace = config.api.shutdown_grace_s
    # uvicorn serves from a secondary thread; the engine loop owns the main thread (see
    # Engine.run_forever), so signals are handled here rather than by uvicorn.
    server = uvicorn.Server(uvicorn.Config(app, host=config.api.host, port=config.api.port, log_level="warning",
                                           timeout_graceful_shutdown=int(grace) + 5, access_log=False))
    server_thread = threading.Thread(target=server.run, name="http", daemon=True)

    def shut_down() -> None:
        """Stop accepting; running requests get `grace` seconds, the rest are aborted (finish_reason
        "abort") so their responses end; then the engine loop stops and the process exits 0."""
        server.should_exit = True
        engine.drain(grace)
        server_thread.join(timeout=grace + 10)
        engine.stop()

    def on_signal(sig, frame) -> None:
        if getattr(on_signal, "called", False):
            log.warning("second signal: exiting now")
            os._exit(1)
        on_signal.called = True
        log.info("signal %s: draining (grace %.0f s)", signal.Signals(sig).name, grace)
        threading.Thread(target=shut_down, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server_thread.start()
    log.info("serving %s on http://%s:%d (auth %s)", engine.model_name, config.api.host, config.api.port,
             "on" if config.api.api_keys else "off")

    def watch_http() -> None:
        server_thread.join()
        if not on_signal.__dict__.get("called"):
            log.error("the HTTP server stopped (port %d in use?)", config.api.port)
            engine.stop()
    threading.Thread(target=watch_http, name="http-watch", daemon=True).start()
    engine.run_forever()
    if not engine.stopping:       # the loop died: keep answering /health with 503 until told to stop
        server_thread.join()
    if not server.started:
        return 1
    log.info("stopped")
    return 0
