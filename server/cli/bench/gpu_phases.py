"""The measuring phases of `customllm bench gpu`, each run in a process of its own
(`python -m server.cli.bench.gpu_phases PHASE PARAMS.json OUT.json`) so that the check can hold it to
its time budget and every phase starts with the accelerator's memory free.

- `decode`: a model of a preset with random weights made on the device itself (the 973M model's
  weights are never shipped: 2 GB in bfloat16), measured by `bench engine`'s own code.
- `peers`: the built-in model against Hugging Face transformers, as `bench engine --peers
  transformers` measures them: ours, then transformers, then ours again (when the budget allows),
  in the same process. Where the built-in GGUF is not installed (a device machine: its 98 MB are over
  what a run may carry) both sides run the built-in model's architecture (preset `smollm2-135m`)
  with random weights instead; the time of a step does not depend on the weights' values.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from model.cache.kv_cache import GIB
from model.config import BaseModelConfig, preset
from model.dtypes import DTYPES
from server.cli.bench.peers import TransformersPeer

log = logging.getLogger("customllm.bench")

TRAINED_TOKENS = 512          # the byte-level BPE trained for a random checkpoint; fillers up to its vocabulary
BUILTIN_PRESET = "smollm2-135m"   # the built-in model's architecture (tests check it against the GGUF)


class _ParameterView:
    """Some of a model's parameters, under their names: what `init_random_` reads of a module."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]):
        self._named = named

    def named_parameters(self):
        return iter(self._named)


@torch.no_grad()
def random_weights_on_device(config: BaseModelConfig, dtype: torch.dtype, device: torch.device,
                             seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """`random_model`'s distribution (matrices N(0, std²), vectors as `init_random_` sets them), with the
    matrices drawn on `device` itself: the 973M model's take a second on a GPU, not half a minute on a CPU."""
    from model.loading.init_weights import init_random_
    from model.registry import build_model

    model = build_model(config, device="meta")
    model.to_empty(device=device)
    model.to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    named = list(model.named_parameters())
    for _, param in named:
        if param.dim() >= 2:
            param.normal_(0.0, std, generator=generator)
    init_random_(_ParameterView([(name, p) for name, p in named if p.dim() < 2]), seed, std)
    return model.eval()


def write_padded_tokenizer(out: Path, vocab_size: int) -> int:
    """`out/tokenizer.json`: a byte-level BPE trained on a few hundred tokens, its vocabulary filled up to
    exactly `vocab_size` with filler tokens, so that every id a random model samples detokenizes.
    Returns the trained part's size."""
    from server.cli.tiny_tokenizer import train_byte_level_bpe

    trained = train_byte_level_bpe(min(vocab_size, TRAINED_TOKENS), out)
    if vocab_size > trained:
        path = out / "tokenizer.json"
        document = json.loads(path.read_text())
        vocab = document["model"]["vocab"]
        vocab.update({f"<|filler-{i}|>": i for i in range(trained, vocab_size)})
        path.write_text(json.dumps(document))
    return trained


def random_checkpoint(preset_name: str, dtype: torch.dtype, device: torch.device, out: Path) -> Path:
    """A checkpoint directory as `customllm weights init --preset NAME` writes it (weights in `dtype`),
    plus a tokenizer covering the whole vocabulary."""
    from model.loading.init_weights import save_checkpoint

    config = preset(preset_name)
    started = time.perf_counter()
    model = random_weights_on_device(config, dtype, device)
    save_checkpoint(model, out, {"preset": preset_name})
    del model
    _free(device)
    write_padded_tokenizer(out, config.vocab_size)
    log.info("%s: random %s weights written to %s in %.1f s", preset_name, str(dtype).removeprefix("torch."), out,
             time.perf_counter() - started)
    return out


def kv_cache_gib(config: BaseModelConfig, max_batch: int, context_len: int, output_len: int, dtype_bytes: int,
                 block_size: int = 16) -> float:
    """Room for every sequence of the largest batch (a block of slack each), and a quarter more."""
    tokens = max_batch * (context_len + output_len + 2 * block_size)
    return max(0.02, 1.25 * tokens * config.cache_bytes_per_token(dtype_bytes) / GIB)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _engine_run(model_dir: str, params: dict, batch_sizes: list[int], context_len: int, output_len: int,
                kv_gib: float) -> dict:
    from server.cli.bench.engine_bench import bench_engine

    result = bench_engine(model_dir, None, None, params["device"], params["dtype"], batch_sizes, context_len,
                          output_len, kv_gib, threads=params.get("threads"),
                          max_num_batched_tokens=params.get("max_num_batched_tokens"),
                          overlap_steps=params.get("overlap_steps", False))
    _free(torch.device(params["device"]))
    return result


def decode_phase(params: dict, work: Path, save) -> dict:
    """`bench engine` on a random checkpoint of `params["preset"]`."""
    device, dtype = torch.device(params["device"]), DTYPES[params["dtype"]]
    config = preset(params["preset"])
    checkpoint = random_checkpoint(params["preset"], dtype, device, work / params["preset"])
    kv_gib = kv_cache_gib(config, max(params["batch_sizes"]), params["context_len"], params["output_len"],
                          dtype.itemsize)
    result = _engine_run(str(checkpoint), params, params["batch_sizes"], params["context_len"],
                         params["output_len"], kv_gib)
    result.update(preset=params["preset"], weights_source="random", kv_cache_gib=kv_gib)
    return result


class RandomTransformersPeer(TransformersPeer):
    """Hugging Face's LlamaForCausalLM of a Llama-family config with random weights, measured by
    `TransformersPeer`'s own methods (RoPE's base is left at transformers' default: it does not
    change the time of a step)."""

    def __init__(self, config, dtype: torch.dtype, device: torch.device):   # no GGUF to load: not super()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import LlamaConfig as HFLlamaConfig
        from transformers import LlamaForCausalLM

        hf_config = HFLlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_context, tie_word_embeddings=config.tie_word_embeddings,
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=0)
        self.device = torch.device(device)
        self.model = LlamaForCausalLM(hf_config).to(device=self.device, dtype=dtype).eval()
        self.vocab = config.vocab_size


def _compare(result: dict) -> None:
    """Each transformers row with ours at the same concurrency: every run of ours, their mean, the ratio."""
    for row in result["rows"]:
        ours = [next(r["decode_tokens_per_s"] for r in run["results"] if r["batch_size"] == row["concurrency"])
                for run in result["engine_runs"]]
        row["ours_runs_tokens_per_s"] = ours
        row["ours_tokens_per_s"] = sum(ours) / len(ours)
        row["ours_over_transformers"] = row["ours_tokens_per_s"] / row["transformers_generate_tokens_per_s"]


def peers_phase(params: dict, work: Path, save) -> dict:
    """Ours (the engine, as `bench engine`), transformers `generate`, ours again (when the budget allows),
    then transformers `generate_batch` (when asked): the result so far is saved after each, so that a
    phase stopped at its budget still reports what it measured."""
    from model.loading.builtin import builtin_model_path

    device, dtype = torch.device(params["device"]), DTYPES[params["dtype"]]
    deadline = time.monotonic() + params["budget_s"]
    concurrency, context_len, output_len = params["concurrency"], params["context_len"], params["output_len"]
    if params["source"] == "gguf":
        from gguf import GGUFReader

        from model.loading.gguf_file import config_from_gguf, read_fields
        gguf = builtin_model_path()
        reader = GGUFReader(str(gguf))
        config, model_dir = config_from_gguf(read_fields(reader), {t.name for t in reader.tensors}), str(gguf)
        source = "built-in GGUF"
    else:
        config = preset(params["stand_in_preset"])
        model_dir = str(random_checkpoint(params["stand_in_preset"], dtype, device, work / "stand-in"))
        source = f"random weights, preset {params['stand_in_preset']}"
    kv_gib = kv_cache_gib(config, max(concurrency), context_len, output_len, dtype.itemsize)
    started = time.monotonic()
    first = _engine_run(model_dir, params, concurrency, context_len, output_len, kv_gib)
    ours_s = time.monotonic() - started
    result = {"model_source": source, "model": first["model"], "dtype": first["dtype"], "context_len": context_len,
              "output_len": output_len, "rows": [], "engine_runs": [first]}
    save(result)

    log.info("transformers on the same model (%s)", source)
    if params["source"] == "gguf":
        peer = TransformersPeer(Path(model_dir), dtype=dtype, device=device)
    else:
        peer = RandomTransformersPeer(config, dtype, device)
    for batch in concurrency:
        rate = peer.decode_tokens_per_s(batch, context_len, output_len)
        log.info("transformers generate, %d sequences: %.1f tok/s", batch, rate)
        result["rows"].append({"concurrency": batch, "transformers_generate_tokens_per_s": rate})
        _compare(result)
        save(result)
    if time.monotonic() + 1.5 * ours_s < deadline:
        result["engine_runs"].append(_engine_run(model_dir, params, concurrency, context_len, output_len, kv_gib))
        _compare(result)
        save(result)
    else:
        log.info("no time left for the second run of ours (%.0f s each)", ours_s)
    for row in result["rows"] if params.get("generate_batch") else ():
        try:
            rate = peer.continuous_batching_tokens_per_s(row["concurrency"], context_len, output_len)
            row["transformers_generate_batch_tokens_per_s"] = rate
            log.info("transformers generate_batch, %d sequences: %s tok/s", row["concurrency"], rate)
        except Exception as exc:  # noqa: BLE001 - the peer's own failure is reported, not raised
            row["transformers_generate_batch_error"] = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("transformers generate_batch failed: %s", row["transformers_generate_batch_error"])
        save(result)
    return result


PHASES = {"decode": decode_phase, "peers": peers_phase}


def main(argv: list[str]) -> int:
    """PHASE PARAMS.json OUT.json: run one phase; its result (with the device's name) is written to
    OUT.json whenever the phase saves it, and at its end."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    phase, params_path, out_path = argv
    params = json.loads(Path(params_path).read_text())
    work = Path(params["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(params["device"])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def save(result: dict) -> None:
        partial = Path(out_path).with_suffix(".tmp")
        partial.write_text(json.dumps(dict(result, device_name=device_name), indent=2) + "\n")
        partial.replace(out_path)          # whole files only, for a phase stopped mid-write

    save(PHASES[phase](params, work, save))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
