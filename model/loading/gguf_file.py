"""GGUF files of the Llama family: metadata → `LlamaConfig`, tensors under our (Hugging Face) parameter
names with the q/k row permutation undone, and the tokenizer and chat template from the metadata.

Tensors are dequantised to the serving dtype, or, with `quantization` other than "none", the
projections' quantized tensors are kept as int4/int8 codes (model/loading/gguf_quant.py: Q4_0/Q4_1
exactly) and built into `QuantizedLinear`s; a tied head quantized that way gets a Linear of its own
while the embedding table stays float for look-ups.

`load_gguf(path)` gives the pieces (`GGUFModel`: config, state dict, tokenizer, template, metadata);
`load_gguf_model(path)` also builds the module and moves the weights into it.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.families.llama import FusedProjections, LlamaConfig, LlamaForCausalLM, join_fused_weights
from model.layers.quantize import INT8, QuantizedWeight, head_kind, quantize
from model.layers.quantized_linear import QuantizedLinear, replace_module
from model.loading.gguf_quant import gguf_quantized, kept_kind
from model.text.tokenizer import TextTokenizer

log = logging.getLogger("customllm.gguf")

# what gguf.quants.dequantize handles and we have checked; everything else is refused by name
SUPPORTED_TYPES = frozenset({"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LARGE_ARRAY = 16   # metadata arrays longer than this are summarised by their length


@dataclass
class GGUFModel:
    """A GGUF file in our terms. `state_dict` uses `LlamaForCausalLM`'s parameter names, in `dtype`;
    `build_model()` moves those tensors into a module (emptying `state_dict`). The tokenizer is built
    from `tokenizer_fields` when first asked for, so a file whose tokenizer we cannot build still
    loads when another tokenizer is given."""

    path: Path
    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_fields: dict[str, Any]
    chat_template: str | None
    metadata: dict[str, Any]
    name: str
    model: LlamaForCausalLM | None = field(default=None, repr=False)
    # projection weights kept as int4/int8 codes, by parameter name (a tied head as "lm_head.weight")
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict, repr=False)

    @cached_property
    def tokenizer(self) -> TextTokenizer:
        started = time.monotonic()
        tokenizer = TextTokenizer.from_gguf_metadata(self.tokenizer_fields)
        log.info("gguf %s: tokenizer of %d tokens built in %.1f s", self.path.name, tokenizer.vocab_size,
                 time.monotonic() - started)
        return tokenizer

    @property
    def tokenizer_json(self) -> str:
        """The tokenizer as a tokenizer.json document."""
        return self.tokenizer.tokenizer.to_str()

    def build_model(self, device: torch.device | str = "cpu") -> LlamaForCausalLM:
        """Build the module on the meta device and assign the weights (no copy on the CPU; q/k/v and
        gate/up joined one layer at a time)."""
        from model.loading.state_dict import check_keys
        from model.registry import build_model

        started = time.monotonic()
        model = build_model(self.config, device="meta")
        quantized, self.quantized = self.quantized, {}
        tied_head = quantized.pop("lm_head.weight", None) if self.config.tie_word_embeddings else None
        check_keys(model, {**self.state_dict, **quantized}, source=self.path.name)
        state, self.state_dict = self.state_dict, {}
        join_fused_weights(model, state)
        _join_fused_quantized(model, quantized, state)
        dtype = next(iter(state.values())).dtype
        for key, weight in quantized.items():
            replace_module(model, key.removesuffix(".weight"), QuantizedLinear.holding(weight, dtype=dtype))
        if tied_head is not None:
            model.lm_head = QuantizedLinear.holding(tied_head, dtype=dtype)
        for key in state:
            state[key] = state[key].to(device)
        held = tuple(key.removesuffix("weight") for key in quantized) + (("lm_head.",) if tied_head else ())
        result = model.load_state_dict(state, strict=False, assign=True)
        missing = [key for key in result.missing_keys if not key.startswith(held)]
        assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
        self.model = model.eval()
        log.info("gguf %s: model on %s in %.1f s", self.path.name, device, time.monotonic() - started)
        return self.model


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def read_fields(reader, prefix: str = "") -> dict[str, Any]:
    """Metadata fields under `prefix` as plain Python values (arrays as lists)."""
    return {key: _plain(f.contents()) for key, f in reader.fields.items()
            if key.startswith(prefix) and not key.startswith("GGUF.")}


def metadata_summary(reader, path: Path) -> dict[str, Any]:
    """Scalar metadata as it is, long arrays by their length, plus tensor counts per type."""
    from gguf import GGUFValueType

    summary: dict[str, Any] = {"file": str(path)}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "tokenizer.chat_template":
            continue
        if f.types and f.types[0] == GGUFValueType.ARRAY and len(f.data) > LARGE_ARRAY:
            summary[key] = f"<array of {len(f.data)}>"
        else:
            summary[key] = _plain(f.contents())
    summary["tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    summary["tensor_count"] = len(reader.tensors)
    return summary


def config_from_gguf(fields: dict[str, Any], tensor_names: set[str]) -> LlamaConfig:
    """`LlamaConfig` from the metadata; anything this family does not compute is refused by name."""
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default=None):
        value = fields.get("llama." + key, default)
        if value is None:
            raise ValueError(f"GGUF metadata has no llama.{key}")
        return value

    heads, hidden = int(get("attention.head_count")), int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError("GGUF: key and value head sizes differ; not a Llama this server can run")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"GGUF: RoPE over {get('rope.dimension_count')} of {head_dim} head dims is not supported")
    scaling = fields.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError(f"GGUF: RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs'}) is not supported")
    if int(fields.get("llama.expert_count", 0) or 0) > 0:
        raise ValueError("GGUF: mixture-of-experts Llama files are not supported")
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = int(fields.get("llama.vocab_size", 0) or 0) or (len(tokens) if tokens else 0)
    if not vocab:
        raise ValueError("GGUF metadata gives no vocabulary size")
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")), rope_theta=_decimal(get("rope.freq_base", 10000.0)),
        rms_norm_eps=_decimal(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_context=int(get("context_length", 2048)), tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"), eos_token_id=fields.get("tokenizer.ggml.eos_token_id"))


def _decimal(value) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 → 1e-05)."""
    return float(str(np.float32(value)))


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order so rotate_half RoPE applies: within each head the rows go from
    interleaved pairs [x0, y0, x1, y1, …] back to halves [x0, x1, …, y0, y1, …]."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def dequantise(tensor, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of `dtype`, shaped [rows, cols] (GGUF lists dims innermost first)."""
    from gguf import GGMLQuantizationType, quants

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF tensor {tensor.name}: quantisation type {kind} is not supported "
                         f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        array = np.array(tensor.data)    # a copy: the reader maps the file read-only
    else:
        array = quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(array.reshape(shape)).to(dtype)


def _join_fused_quantized(model: nn.Module, quantized: dict[str, QuantizedWeight],
                          state: dict[str, torch.Tensor]) -> None:
    """q/k/v and gate/up of `quantized` joined into the fused weights, in place. Parts of different
    kinds are joined as int8 (int4 parts requantized); a part held as float makes them all float."""
    for name, module in model.named_modules():
        if not isinstance(module, FusedProjections):
            continue
        prefix = f"{name}." if name else ""
        for fused, parts in module.FUSED.items():
            keys = [prefix + part + ".weight" for part in parts]
            if not any(key in quantized for key in keys):
                continue
            if not all(key in quantized for key in keys):
                dtype = next(state[key] for key in keys if key in state).dtype
                state[prefix + fused + ".weight"] = torch.cat(
                    [state.pop(k) if k in state else quantized.pop(k).dequantize(dtype) for k in keys])
                continue
            weights = [quantized.pop(key) for key in keys]
            if len({w.kind for w in weights}) > 1:
                weights = [w if w.kind == INT8 else quantize(w.dequantize(), INT8) for w in weights]
            quantized[prefix + fused + ".weight"] = QuantizedWeight.cat(weights)


def _projection(key: str) -> bool:
    """Whether a parameter is the weight of a Linear (a quantizable projection) or the tied head."""
    return key.endswith(("_proj.weight", "lm_head.weight", "embed_tokens.weight"))


def gguf_state_dict(reader, config: LlamaConfig, dtype: torch.dtype,
                    quantization: str = "none") -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """Every tensor under our parameter name, dequantised one at a time straight to `dtype`, except
    the projections' quantized tensors that `quantization` keeps as codes (`gguf_quant.kept_kind`),
    given in the second dict. A tied head (`token_embd`) kept so is in both: float for the embedding,
    codes under "lm_head.weight"."""
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedWeight] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name in GLOBAL_TENSORS:
            key, kind = GLOBAL_TENSORS[name], None
        elif name.startswith("blk.") and name.count(".") == 3 and name.endswith(".weight") \
                and name.split(".")[2] in LAYER_TENSORS:
            _, index, kind, _ = name.split(".")
            key = f"model.layers.{index}.{LAYER_TENSORS[kind]}.weight"
        else:
            raise ValueError(f"GGUF tensor {name} has no place in a Llama model")
        heads = config.num_heads if kind == "attn_q" else config.num_kv_heads if kind == "attn_k" else None
        keep = kept_kind(tensor.tensor_type.name, quantization) if _projection(key) else None
        tied = key == "model.embed_tokens.weight"
        if keep is not None and quantization != "auto" and (tied or key == "lm_head.weight"):
            keep = head_kind(keep)                        # asked for int4: the head as int8 (the file's own: as is)
        if keep is not None and (not tied or config.tie_word_embeddings):
            codes = gguf_quantized(tensor, keep, lambda: dequantise(tensor, torch.float32))
            if heads is not None:
                codes = codes.select_rows(unpermute_rows(torch.arange(codes.shape[0])[:, None], heads)[:, 0])
            quantized["lm_head.weight" if tied else key] = codes
            if not tied:
                continue
        weight = dequantise(tensor, dtype)
        if heads is not None:
            weight = unpermute_rows(weight, heads)
        state[key] = weight
    return state, quantized


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, quantization: str = "none") -> GGUFModel:
    """Read a Llama-family GGUF: config, state dict in `dtype` (and the quantized projections that
    `quantization` keeps: "none", "auto" for each type's nearest kernel codes, "int4", "int8"),
    tokenizer metadata, chat template and a metadata summary. Raises ValueError for what this
    server cannot run."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    started = time.monotonic()
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises bare ValueError/struct errors for damaged files
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from None
    fields = read_fields(reader)
    config = config_from_gguf(fields, {t.name for t in reader.tensors})
    metadata = metadata_summary(reader, path)
    log.info("gguf %s: llama, %d layers, d %d, %d heads / %d kv heads, vocab %d, %s", path.name,
             config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.vocab_size,
             ", ".join(f"{n} {k}" for k, n in metadata["tensor_types"].items()))
    state, quantized = gguf_state_dict(reader, config, dtype, quantization)
    log.info("gguf %s: %d tensors dequantised to %s, %d kept quantized (%s) in %.1f s", path.name, len(state),
             str(dtype).removeprefix("torch."), len(quantized),
             ", ".join(f"{n} {k}" for k, n in Counter(w.kind for w in quantized.values()).items()) or "none",
             time.monotonic() - started)
    tokenizer_fields = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    name = str(fields.get("general.name") or path.stem)
    return GGUFModel(path, config, state, tokenizer_fields, fields.get("tokenizer.chat_template"), metadata, name,
                     quantized=quantized)


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", quantization: str = "none") -> GGUFModel:
    """`load_gguf` and `build_model` in one: the returned object's `.model` is ready (eval mode)."""
    if quantization != "none" and torch.device(device).type != "cpu":
        raise ValueError("quantized GGUF weights run in CPU kernels; use --quantization none on CUDA")
    loaded = load_gguf(path, dtype, quantization)
    loaded.build_model(device)
    return loaded
