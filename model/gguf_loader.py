"""GGUF loading for the Llama family: metadata → `LlamaConfig`, tensors dequantised to the serving
dtype, the q/k row permutation undone, the tokenizer and chat template from the metadata."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.llama import LlamaConfig, LlamaForCausalLM
from model.registry import build_model

log = logging.getLogger("customllm.gguf")

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass
class GGUFModel:
    model: LlamaForCausalLM
    config: LlamaConfig
    tokenizer: object
    chat_template: str | None
    name: str


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def config_from_gguf(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    p = "llama."
    heads = int(_field(reader, p + "attention.head_count"))
    hidden = int(_field(reader, p + "embedding_length"))
    head_dim = int(_field(reader, p + "rope.dimension_count", hidden // heads))
    if head_dim != hidden // heads:
        raise ValueError("GGUF: partial rotary dimensions are not supported")
    names = {t.name for t in reader.tensors}
    vocab = int(_field(reader, p + "vocab_size", 0)) or len(_field(reader, "tokenizer.ggml.tokens"))
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=int(_field(reader, p + "block_count")),
        num_heads=heads, num_kv_heads=int(_field(reader, p + "attention.head_count_kv", heads)), head_dim=head_dim,
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        max_context=int(_field(reader, p + "context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"))


def _unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved RoPE pairs) so rotate_half RoPE applies:
    rows of each head go from [x0, y0, x1, y1, …] back to [x0, x1, …, y0, y1, …]."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _dequantise(tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF tensor {tensor.name}: quantisation {kind} is not supported "
                         f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        data = np.array(tensor.data)  # copy: the reader maps the file read-only
    else:
        data = quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))   # GGUF lists dims innermost first
    return np.asarray(data, dtype=np.float32).reshape(shape)


def gguf_state_dict(reader, config: LlamaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        array = _dequantise(tensor)
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif name.startswith("blk."):
            _, index, kind, suffix = name.split(".", 3)
            if kind not in LAYER_TENSORS:
                raise ValueError(f"GGUF tensor {name} has no place in a Llama model")
            if kind == "attn_q":
                array = _unpermute_rows(array, config.num_heads)
            elif kind == "attn_k":
                array = _unpermute_rows(array, config.num_kv_heads)
            key = f"model.layers.{index}.{LAYER_TENSORS[kind]}.{suffix}"
        elif name == "rope_freqs.weight":
            continue
        else:
            raise ValueError(f"GGUF tensor {name} has no place in a Llama model")
        state[key] = torch.from_numpy(array).to(dtype)
    return state


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> GGUFModel:
    from gguf import GGUFReader

    from model.loader_common import assign_state_dict
    from model.tokenizer import TextTokenizer

    path = Path(path)
    started = time.monotonic()
    reader = GGUFReader(str(path))
    config = config_from_gguf(reader)
    log.info("gguf %s: llama, %d layers, d %d, %d heads / %d kv heads, vocab %d", path.name, config.num_layers,
             config.hidden_size, config.num_heads, config.num_kv_heads, config.vocab_size)
    state = gguf_state_dict(reader, config, dtype)
    log.info("gguf: %d tensors dequantised in %.1f s", len(state), time.monotonic() - started)
    model = build_model(config, device="meta")
    assign_state_dict(model, state, dtype, device, source=path.name)
    tokenizer = TextTokenizer.from_gguf_reader(reader)
    template = _field(reader, "tokenizer.chat_template")
    return GGUFModel(model.eval(), config, tokenizer, template, str(_field(reader, "general.name", path.stem)))
