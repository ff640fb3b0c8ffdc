"""Build a ready engine from a `ServerConfig`: device and dtype, model, tokenizer, chat template,
KV cache. The only place that turns configuration into loaded objects."""
from __future__ import annotations

import copy
import gc
import logging
import os
import time
from pathlib import Path

import torch

from model.cache.kv_cache import GIB, KVCache
from model.dtypes import DTYPES, parse_dtype
from model.loading.builtin import BUILTIN_NAME, builtin_model_path
from server.config import KV_CACHE_DTYPES, ServerConfig
from server.engine.engine import Engine
from server.engine.results import EngineObserver

log = logging.getLogger("customllm.serving")

DEFAULT_CPU_KV_CACHE_GIB = 1.0
CUDA_KV_CACHE_FRACTION = 0.85


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


MIXED = "mixed"   # CPU: float16 weights for 1-2 token steps, bfloat16 weights and cache otherwise


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the activations and the cache (and of the weights, but for `mixed` and, on a CPU,
    `auto`, whose weights take the formats measured fastest: `weight_format_mode`)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == MIXED:
        if device.type != "cpu":
            raise ValueError("--dtype mixed is a CPU mode; use bfloat16 on CUDA")
        return torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: choose one of auto, {MIXED}, {', '.join(sorted(DTYPES))}")
    return parse_dtype(name)


def resolve_quantization(name: str, dtype_name: str, device: torch.device) -> str:
    """What the weights are held as: "auto" (keep a GGUF's quantized tensors as int4/int8 codes) only
    with `--dtype auto` on a CPU, so that an explicit dtype (float32 above all) stays exact; "none";
    or "int8"/"int4" (CPU kernels)."""
    if name == "auto":
        return "auto" if dtype_name == "auto" and device.type == "cpu" else "none"
    if name in ("int8", "int4"):
        if device.type != "cpu":
            raise ValueError(f"--quantization {name} runs in CPU kernels; use none on {device.type}")
        if dtype_name == MIXED:
            raise ValueError(f"--quantization {name} does not combine with --dtype {MIXED}; use --dtype auto")
    elif name != "none":
        raise ValueError(f"--quantization {name!r}: choose auto, none, int8 or int4")
    return name


def resolve_cache_dtype(name: str, dtype: torch.dtype, device: torch.device, format_mode: str = "exact") -> torch.dtype:
    """What the KV cache holds (`--kv-cache-dtype`). auto: float16 on the CPU when the weights' formats
    are chosen by speed (`format_mode` "measured" or "lean": `--dtype auto`, `--quantization`) over
    float32 activations (half the bytes of long contexts, twice the tokens per GiB; llama.cpp's default
    too), else the activations' dtype (`dtype`: `--dtype float32` keeps the exact float32 cache).
    Another dtype only on the CPU, whose attention paths convert what they read (the CUDA kernels and
    graphs read the model's own dtype)."""
    if name == "auto":
        fast = device.type == "cpu" and format_mode != "exact" and dtype == torch.float32
        return torch.float16 if fast else dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {name!r}: choose one of {', '.join(KV_CACHE_DTYPES)}")
    chosen = getattr(torch, name)
    if chosen != dtype and device.type != "cpu":
        raise ValueError(f"--kv-cache-dtype {name} differs from the model's {str(dtype).removeprefix('torch.')}: "
                         "only on the CPU")
    return chosen


def weight_format_mode(dtype_name: str, quantization: str, device: torch.device) -> str:
    """How model.layers.kernel_choice stores the Linears: "measured" (every format the values allow,
    timed) for `--dtype auto` on a CPU, "lean" (quantized weights in their kernel's format only) when
    `--quantization int8|int4` is asked for, "exact" (as loaded) otherwise."""
    if device.type != "cpu" or dtype_name != "auto":
        return "exact"
    return "lean" if quantization in ("int8", "int4") else "measured"


def kv_cache_budget_bytes(gib: float | None, device: torch.device) -> int:
    """The cache memory: as configured, else a fraction of the GPU memory left after the weights,
    else a fixed CPU default."""
    if gib is not None:
        if gib <= 0:
            raise ValueError("--kv-cache-memory must be positive (GiB)")
        return int(gib * GIB)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_KV_CACHE_FRACTION)
    return int(DEFAULT_CPU_KV_CACHE_GIB * GIB)


def special_token_texts(tokenizer) -> dict[str, str]:
    """`bos_token` / `eos_token` as text, which chat templates written for Hugging Face read."""
    texts = {}
    for name in ("bos", "eos"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        text = tokenizer.id_to_token(token_id) if token_id is not None and hasattr(tokenizer, "id_to_token") else None
        if text:
            texts[f"{name}_token"] = text
    return texts


def load_model_and_tokenizer(config: ServerConfig, device: torch.device, dtype: torch.dtype,
                             quantization: str = "none"):
    """(model, tokenizer, chat template or None, model name, the file or directory the tokenizer was
    read from); the weights quantized as `quantization` says (`resolve_quantization`)."""
    from model.text.chat_template import ChatTemplate
    from model.text.tokenizer import load_tokenizer

    mcfg = config.model
    path = Path(mcfg.model) if mcfg.model else builtin_model_path()
    started = time.monotonic()
    log.info("loading model from %s (%s on %s)", path, str(dtype).removeprefix("torch."), device)
    template_source = None
    if path.suffix == ".gguf":
        from model.loading.gguf_file import load_gguf_model
        loaded = load_gguf_model(path, dtype=dtype, device=device, quantization=quantization)
        model, template_source = loaded.model, loaded.chat_template
        tokenizer = load_tokenizer(mcfg.tokenizer, mcfg.byte_level_decoder) if mcfg.tokenizer else loaded.tokenizer
        tokenizer_source = mcfg.tokenizer or path
    else:
        from model.loading.loader import load_model
        loaded = load_model(path, preset=mcfg.preset, dtype=dtype, device=device)
        model = loaded.model
        for warning in loaded.warnings:
            log.warning("%s", warning)
        tokenizer_source = mcfg.tokenizer or loaded.tokenizer_dir
        if tokenizer_source is None:
            raise ValueError(f"{path}: no tokenizer beside the checkpoint; pass --tokenizer PATH")
        tokenizer = load_tokenizer(tokenizer_source, mcfg.byte_level_decoder)
        template_source = getattr(tokenizer, "chat_template", None) or getattr(loaded, "chat_template", None)
    if quantization in ("int8", "int4"):
        from model.layers.quantized_linear import quantize_model
        started_quantizing = time.monotonic()
        count = quantize_model(model, quantization)
        log.info("quantized %d weight matrices to %s in %.1f s", count, quantization,
                 time.monotonic() - started_quantizing)
    if mcfg.chat_template:
        template_source = Path(mcfg.chat_template).read_text()
    chat_template = ChatTemplate(template_source, **special_token_texts(tokenizer)) if template_source else None
    if chat_template is not None and chat_template.takes("tools") and "<tool_call>" not in template_source:
        log.warning("the chat template takes tools but does not mention <tool_call>: tool calls are parsed in the "
                    "Hermes format (docs/structured-outputs.md), which this model may not write")
    name = mcfg.served_model_name or (BUILTIN_NAME if mcfg.model is None else path.stem if path.is_file() else path.name)
    log.info("model %s ready in %.1f s: %s parameters", name, time.monotonic() - started,
             f"{sum(p.numel() for p in model.parameters()):,}")
    return model.eval(), tokenizer, chat_template, name, str(tokenizer_source)


def resolve_decode_attention(choice: str, device: torch.device) -> str:
    """"torch", "triton" or "cpu": auto takes the Triton kernel on CUDA when triton imports, and on
    the CPU the C kernel that reads the paged cache in place (model/layers/cpu_decode_attention.py)
    when it builds here; the Triton kernel runs on the CPU only in Triton's interpreter
    (TRITON_INTERPRET=1, for tests)."""
    if choice not in ("auto", "torch", "triton", "cpu"):
        raise ValueError(f"--decode-attention must be auto, torch, triton or cpu, not {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "cpu" or (choice == "auto" and device.type == "cpu"):
        from model.layers.cpu_decode_attention import available as cpu_kernel_available
        if device.type != "cpu":
            raise ValueError("--decode-attention cpu runs on the CPU")
        if cpu_kernel_available():
            return "cpu"
        if choice == "cpu":
            raise ValueError("--decode-attention cpu needs a C compiler (cc, gcc or $CC) to build its kernel")
        return "torch"
    try:
        import triton  # noqa: F401
        available = True
    except ImportError:
        available = False
    if choice == "auto":
        return "triton" if available and device.type == "cuda" else "torch"
    if not available:
        raise ValueError("--decode-attention triton needs the triton package (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--decode-attention triton runs on CUDA (or on the CPU with TRITON_INTERPRET=1)")
    return "triton"


def freeze_loaded_objects() -> None:
    """For a process that loads one model and then serves until it exits (`serve`, the engine-core
    process, `bench engine`): what is loaded now lives as long as the process, so it is moved out of
    the garbage collector's sight; its full collections (every few thousand allocations while
    serving) then no longer walk the model's modules and the tokenizer's tables (~5 % of a batch-16
    decode profile of the built-in model). Not for tests, which build many engines in one process."""
    gc.collect()
    gc.freeze()


def build_engine(config: ServerConfig, observer: EngineObserver | None = None, start: bool = True) -> Engine:
    device = resolve_device(config.model.device)
    dtype = resolve_dtype(config.model.dtype, device)
    quantization = resolve_quantization(config.model.quantization, config.model.dtype, device)
    format_mode = weight_format_mode(config.model.dtype, quantization, device)
    cache_dtype = resolve_cache_dtype(config.model.kv_cache_dtype, dtype, device, format_mode)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer, chat_template, name, tokenizer_source = load_model_and_tokenizer(config, device, dtype, quantization)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}; pass the model's own tokenizer")
    from model.layers.cpu_layout import use_column_major_weights
    from model.layers.kernel_choice import Timings, choose_formats
    timings = Timings()
    decode_attention = resolve_decode_attention(config.model.decode_attention, device)
    one_call_steps = decode_attention == "cpu" and config.model.dtype != MIXED      # float32 activations
    choose_formats(model, format_mode, timings, keep_codes=one_call_steps)
    from model.layers.quantized_linear import fuse_quantized_projections, release_held_codes
    fused = fuse_quantized_projections(model)     # quantized projections of one input as one product
    if fused:
        log.info("%d groups of quantized projections of one input joined into one product each", fused)
    moved = use_column_major_weights(model)       # float32 CPU weights only
    if moved:
        log.info("%d float32 weight matrices stored column-major (MKL's fast layout for small batches)", moved)
    kernel_layers = 0
    if decode_attention == "triton":
        from model.kernels import use_triton_decode_attention
        kernel_layers = use_triton_decode_attention(model)
        log.info("decode attention: Triton paged decode kernel in %d layers", kernel_layers)
    elif decode_attention == "cpu":
        from model.layers.cpu_decode_attention import use_cpu_decode_attention
        cpu_layers = use_cpu_decode_attention(model)
        if cpu_layers:
            log.info("decode attention: CPU paged decode kernel (cache read in place) in %d layers", cpu_layers)
    if device.type == "cpu" and dtype == torch.float32 and format_mode != "exact":
        from model.layers.prefill_attention import use_prefill_attention_dtype
        use_prefill_attention_dtype(model, timings)  # rounded activations already: prompts' attention may be 16-bit
    small_step_model = None
    if config.model.dtype == MIXED:
        small_step_model = copy.deepcopy(model).to(torch.float16)
        log.info("mixed precision: float16 weights for steps of 1-2 tokens, bfloat16 for larger steps")
    if one_call_steps:                              # a family's decode layers in one C call, where it has one
        from model.families import custom_llm_cpu_step, llama_cpu_step
        for family_step in (llama_cpu_step, custom_llm_cpu_step):
            family_step.use_cpu_decode_step(model, choice=(format_mode, timings, cache_dtype))
        release_held_codes(model)
    budget = kv_cache_budget_bytes(config.engine.kv_cache_memory_gib, device)
    cache = KVCache.from_budget(model.config, budget, config.engine.block_size, cache_dtype, device)
    log.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB, %s, %d bytes per token)", cache.num_blocks,
             cache.block_size, cache.num_blocks * cache.block_size, cache.total_bytes / GIB,
             str(cache_dtype).removeprefix("torch."), cache.bytes_per_token)
    decode_graphs = None
    if device.type == "cuda" and config.model.cuda_graphs and kernel_layers:
        from server.executor.decode_graphs import make_decode_graphs
        decode_graphs = make_decode_graphs(model, cache, config.engine.max_num_seqs, capture=True)
    if config.model.compile_decode:
        if device.type != "cpu" or small_step_model is not None:
            log.warning("--compile-decode is for the CPU without --dtype mixed: decode steps run eagerly")
        else:
            from server.executor.compiled_decode import make_compiled_decode
            decode_graphs = make_compiled_decode(model, cache, config.engine.max_num_seqs)
    engine = Engine(model, cache, tokenizer, config.engine, model_name=name, chat_template=chat_template,
                    device=device, observer=observer,
                    stop_token_ids=tuple(getattr(tokenizer, "stop_token_ids", ()) or ()),
                    small_step_model=small_step_model, decode_graphs=decode_graphs)
    engine.tokenizer_source = tokenizer_source      # what an API process in front of it loads
    if start:
        engine.start()
    return engine
