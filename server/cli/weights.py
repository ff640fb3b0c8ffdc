"""`customllm weights init|inspect|presets`: random checkpoints for tests and benchmarks, a look inside
one, and the architecture presets."""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch

from model.dtypes import DTYPES, dtype_bytes, parse_dtype


def add_parser(subparsers) -> None:
    weights = subparsers.add_parser("weights", help="init (random weights), inspect checkpoints, list presets")
    actions = weights.add_subparsers(dest="weights_action", required=True)
    init = actions.add_parser("init", help="write a random-initialised checkpoint (safetensors + config.json)")
    init.add_argument("--preset", required=True, help="architecture (`customllm weights presets` lists them)")
    init.add_argument("--out", required=True, help="output directory")
    init.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--std", type=float, default=0.02, help="standard deviation of the random matrices")
    init.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field (e.g. --set vocab_size=49152)")
    init.add_argument("--train-tokenizer", type=int, default=None, metavar="N",
                      help="also train an N-token byte-level BPE tokenizer (ChatML template) into the directory, "
                      "in about a second, and set vocab_size to N (for benchmarks of the serving path)")
    init.set_defaults(func=run_init)
    inspect = actions.add_parser("inspect", help="architecture, parameters, dtype, cache bytes per token, weight "
                                 "bytes one decode step reads (as stored, none, int8, int4)")
    inspect.add_argument("path")
    inspect.add_argument("--preset", default=None)
    inspect.set_defaults(func=run_inspect)
    listing = actions.add_parser("presets", help="the architecture presets: family, size, cache bytes per token")
    listing.set_defaults(func=run_presets)


def run_presets(args) -> int:
    from model.registry import build_model, presets

    print(f"{'preset':<18} {'family':<11} {'parameters':>13} {'layers':>6} {'hidden':>6} {'vocab':>6} "
          f"{'context':>7} {'cache B/token (bf16)':>20}")
    for name, config in sorted(presets().items()):
        params = sum(p.numel() for p in build_model(config, device="meta").parameters())
        print(f"{name:<18} {config.family:<11} {params:>13,} {config.num_layers:>6} {config.hidden_size:>6} "
              f"{config.vocab_size:>6} {config.max_context:>7} {config.cache_bytes_per_token(2):>20,}")
    return 0


def _parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE")
        key, value = pair.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def run_init(args) -> int:
    from model.config import preset
    from model.loading.init_weights import random_model, save_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = preset(args.preset)
    overrides = _parse_overrides(args.set)
    if args.train_tokenizer is not None:
        overrides["vocab_size"] = args.train_tokenizer
    if overrides:
        config = config.replace(**overrides)
    started = time.monotonic()
    model = random_model(config, seed=args.seed, std=args.std, dtype=parse_dtype(args.dtype))
    out = Path(args.out)
    save_checkpoint(model, out, {"preset": args.preset, **overrides})
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}/model.safetensors: {config.family}, {params:,} parameters, {args.dtype}, "
          f"seed {args.seed}, {time.monotonic() - started:.1f} s")
    if args.train_tokenizer is not None:
        from server.cli.tiny_tokenizer import train_byte_level_bpe
        trained = time.monotonic()
        train_byte_level_bpe(args.train_tokenizer, out)
        print(f"wrote {out}/tokenizer.json: byte-level BPE, {args.train_tokenizer} tokens, "
              f"{time.monotonic() - trained:.1f} s")
    return 0


def run_inspect(args) -> int:
    from model.loading.loader import load_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path = Path(args.path)
    if path.suffix == ".gguf":
        from model.loading.gguf_file import load_gguf_model
        loaded = load_gguf_model(path, quantization="auto")
        model, config, warnings = loaded.model, loaded.config, []
        dtypes = Counter(loaded.metadata["tensor_types"])
    else:
        from model.loading.checkpoint import read_checkpoint
        stored = read_checkpoint(path).state_dict
        dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in stored.values())
        main_dtype = max(dtypes, key=dtypes.get)
        loaded = load_model(path, preset=args.preset, dtype=getattr(torch, main_dtype))
        model, config, warnings = loaded.model, loaded.config, loaded.warnings
    from model.layers.quantized_linear import QuantizedLinear
    from server.cli.bench.memory import weight_bytes_touched
    params = sum(p.numel() for p in model.parameters()) + sum(
        m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantizedLinear)
        and not (m is getattr(model, "lm_head", None) and config.to_dict().get("tie_word_embeddings")))
    print(f"architecture: {config.family}")
    print(f"config: {json.dumps(config.to_dict())}")
    print(f"parameters: {params:,}")
    print(f"dtype: {', '.join(f'{k} ({v} tensors)' for k, v in dtypes.items())}")
    print(f"cache row per token per layer: {config.cache_row_width} values")
    for name in ("bfloat16", "float32"):
        print(f"cache bytes per token ({name}): {config.cache_bytes_per_token(dtype_bytes(parse_dtype(name))):,}")
    print("weight bytes per token (one decode step of one sequence reads):")
    stored = "GGUF quantized tensors kept (--quantization auto)" if path.suffix == ".gguf" else "as stored"
    for name, quantization in ((stored, None), ("none (float32)", "none"), ("int8", "int8"), ("int4", "int4")):
        print(f"  {name}: {weight_bytes_touched(model, 1, quantization):,}")
    for warning in warnings:
        print(f"warning: {warning}")
    return 0
