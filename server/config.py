"""Server configuration: one frozen dataclass per concern, filled in one place (`server/cli/serve.py`).

Derived values (cache blocks from a memory budget, the resolved device and dtype) are computed
where they are used, never written back here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

QUANTIZATIONS = ("auto", "none", "int8", "int4")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelLoadConfig:
    model: str | None = None          # checkpoint file/dir or .gguf; None = the built-in SmolLM2
    preset: str | None = None         # model preset name (architecture numbers)
    tokenizer: str | None = None      # tokenizer.json, .gguf or directory
    byte_level_decoder: bool = False  # SmartLLM's BPE file: decode to readable text, not the seed's
    chat_template: str | None = None  # jinja file overriding the model's template
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    dtype: str = "auto"               # auto (CPU: fastest measured) | float32 | bfloat16 | float16 | mixed
    quantization: str = "auto"        # auto (a GGUF's own, when dtype is auto) | none | int8 | int4
    served_model_name: str | None = None
    decode_attention: str = "auto"    # auto | torch | triton | cpu (decode steps' attention)
    kv_cache_dtype: str = "auto"      # auto (the activations' dtype) | float32 | bfloat16 | float16 (CPU)
    cuda_graphs: bool = True          # decode steps replayed from CUDA graphs where the model allows
    compile_decode: bool = False      # CPU: decode steps through torch.compile, one graph per batch bucket


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_memory_gib: float | None = None   # None: default budget for the device
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting_requests: int = 256
    max_waiting_per_tenant: int | None = None  # None: half of max_waiting_requests
    max_sessions: int = 1024
    session_idle_ttl_s: float = 1800.0
    max_session_pinned_fraction: float = 0.5
    kv_disk_dir: str | None = None             # a disk tier for cache blocks and sessions (None: off)
    kv_disk_gib: float = 10.0                  # its size bound
    kv_host_gib: float = 0.0                   # a host-memory tier between the pool and the disk (0: off)
    grammar_cache_size: int = 256              # compiled grammars kept (LRU by schema text)
    grammar_wrap_up: bool = True               # constrained answers steered to complete within max_tokens
    # detokenize and match stop strings in the engine (off in the engine-core process: the API process does)
    detokenize: bool = True
    # while tenants compete, a step computes at most max(this, tenants × the lightest tenant's requests)
    # tokens, shared equally across them (server/engine/shared_steps.py; 0: off)
    fair_step_tokens: int = 0
    # on a CPU, torch's threads follow the cores other processes leave free (server/executor/thread_governor.py)
    adaptive_threads: bool = False
    # pipeline decode steps one deep: plan step N+1 and finish step N while the forward runs (overlap.py)
    overlap_steps: bool = False
    # prompt-lookup speculation (server/engine/speculation.py), for requests that ask for it
    num_speculative_tokens: int = 0            # draft tokens verified per step (0: off)
    prompt_lookup_max: int = 3                 # longest n-gram looked up
    prompt_lookup_min: int = 1                 # shortest n-gram looked up

    @property
    def waiting_per_tenant_limit(self) -> int:
        """Requests one tenant (API key) may have waiting: a flood of one key leaves room for the others.
        (Without API keys there is one tenant, bounded by max_waiting_requests alone.)"""
        if self.max_waiting_per_tenant is not None:
            return self.max_waiting_per_tenant
        return max(1, self.max_waiting_requests // 2)


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics_require_auth: bool = False
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 8
    max_sequences_per_request: int = 16        # prompts × n of one completions call
    max_stop_strings: int = 4
    max_stop_chars: int = 256
    max_logit_bias: int = 300
    max_tokens_limit: int = 8192
    default_max_tokens: int | None = None      # None: 512 for chat, 16 for completions (within the context)
    public_docs: bool = False                  # /docs, /redoc, /openapi.json without an API key
    header_timeout_s: float = 10.0             # a request's line and headers must arrive within this
    grammar_compile_timeout_s: float = 10.0    # a structured-output grammar must compile within this
    shutdown_grace_s: float = 30.0
    log_requests: bool = True


@dataclass(frozen=True)
class ServerConfig:
    model: ModelLoadConfig = ModelLoadConfig()
    engine: EngineConfig = EngineConfig()
    api: ApiConfig = ApiConfig()
