"""Checkpoint → ready model: the config (preset, `config.json` beside it, a config carried inside,
or inference from the tensors), the module tree on the meta device, strict assignment.

Per-family knowledge lives in small functions keyed by family: how to recognise its keys, how to
infer its config from shapes, and what to warn about.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.loading.checkpoint import read_checkpoint, strip_prefixes
from model.config import BaseModelConfig, CustomLLMConfig, config_from_json, preset as named_preset
from model.loading.state_dict import CheckpointError, assign_state_dict
from model.registry import build_model

log = logging.getLogger("customllm.loader")


@dataclass
class LoadedModel:
    model: nn.Module
    config: BaseModelConfig
    warnings: list[str] = field(default_factory=list)
    tokenizer_dir: Path | None = None


# ---- family detection ---------------------------------------------------------------------------
FAMILY_MARKERS = {  # a key that only this family's checkpoints have
    "custom_llm": "decoder_layers.0.self_attn.kv_proj_d.weight",
    "shomsher": "t_blocks.0.mhattention.W_dkv.weight",
    "smart_llm": "layers.0.attention.wq.weight",
    "llama": "model.layers.0.self_attn.q_proj.weight",
}
LATER_CUSTOM_LLM_LAYOUT = "decoder_layers.0.mlp.shared_experts.0.gate_proj.weight"


def detect_family(state: dict[str, torch.Tensor]) -> str:
    if LATER_CUSTOM_LLM_LAYOUT in state:
        raise CheckpointError(
            "this checkpoint has the later Assign15 layout (MoE keys without `.moe`, e.g. "
            f"{LATER_CUSTOM_LLM_LAYOUT}): that code changed the semantics (9 heads, softmax routing) and "
            "cannot be served as CustomLLM-973M; export the documented layout (decoder_layers.{i}.mlp.moe.…)")
    for family, marker in FAMILY_MARKERS.items():
        if marker in state:
            return family
    sample = ", ".join(sorted(state)[:3])
    raise CheckpointError(f"cannot tell which model family this checkpoint is (first keys: {sample}); "
                          "pass --preset NAME or put a config.json beside it")


def infer_custom_llm_config(state: dict[str, torch.Tensor]) -> CustomLLMConfig:
    """CustomLLM dims from tensor shapes; heads from the saved rotary buffers (inv_freq [r/2]),
    which is the only place the head count shows."""
    vocab, hidden = state["token_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_layers."))
    moe = "decoder_layers.0.mlp.moe."
    shared = sum(1 for k in state if k.startswith(moe + "shared_experts.") and k.endswith("gate_proj.weight"))
    routed = sum(1 for k in state if k.startswith(moe + "routed_experts.") and k.endswith("gate_proj.weight"))
    dims = dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                max_context=state["position_embeddings.weight"].shape[0],
                latent_dim=state["decoder_layers.0.self_attn.kv_proj_d.weight"].shape[0],
                num_shared_experts=shared, num_routed_experts=routed,
                expert_hidden=state[moe + "routed_experts.0.gate_proj.weight"].shape[0])
    inv_freq = state.get("decoder_layers.0.self_attn.rotary_emb.inv_freq")
    rope_width = state["decoder_layers.0.self_attn.rope_k.weight"].shape[0]   # heads * rope_dim
    if inv_freq is not None:
        rope_dim = 2 * inv_freq.shape[0]
        heads = rope_width // rope_dim
        return CustomLLMConfig(**dims, num_heads=heads, head_dim=2 * rope_dim, rope_dim=rope_dim)
    reference = named_preset("custom-llm-973m")
    if all(getattr(reference, k) == v for k, v in dims.items()):
        return reference
    raise CheckpointError("this CustomLLM checkpoint's shapes differ from custom-llm-973m and it carries no "
                          "rotary buffers to read the head count from; pass --preset NAME or a config.json")


def custom_llm_warnings(state: dict[str, torch.Tensor]) -> list[str]:
    biases = [v for k, v in state.items() if k.endswith("routing_bias")]
    norms = [v for k, v in state.items() if k.endswith(("input_norm.weight", "post_attn_norm.weight"))]
    if biases and all(bool((b == 0).all()) for b in biases) and all(bool((n == 1).all()) for n in norms):
        return ["every decoder layer is at its initial values (routing_bias 0, norm weights 1): this looks "
                "like a checkpoint from the seed's training code, whose forward skipped the decoder layers; "
                "its outputs will not be what training saw"]
    return []


CONFIG_INFERENCE = {"custom_llm": infer_custom_llm_config}
FAMILY_WARNINGS = {"custom_llm": custom_llm_warnings}


def resolve_config(state: dict[str, torch.Tensor], directory: Path | None, preset: str | None,
                   embedded: dict | None) -> BaseModelConfig:
    """Explicit preset (then a config.json may still override fields) → config.json → a config
    carried in the checkpoint → inference from the tensors."""
    base = named_preset(preset) if preset else None
    config_json = directory / "config.json" if directory else None
    if config_json is not None and config_json.is_file():
        return config_from_json(config_json, base)
    if base is not None:
        return base
    family = detect_family(state)
    if embedded is not None:
        from model.registry import model_class
        from_seed = getattr(model_class(family), "config_from_embedded", None)
        if from_seed is None:
            raise CheckpointError(f"the checkpoint carries a config, but the {family} family does not read one")
        return from_seed(embedded, state)
    if family == "shomsher":
        from model.families.shomsher import ShomsherLLMForCausalLM
        return ShomsherLLMForCausalLM.infer_config(state)
    if family not in CONFIG_INFERENCE:
        raise CheckpointError(f"a {family} checkpoint does not show its full configuration; "
                              "pass --preset NAME or put a config.json beside it")
    return CONFIG_INFERENCE[family](state)


def load_model(path: str | Path, preset: str | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> LoadedModel:
    path = Path(path)
    started = time.monotonic()
    checkpoint = read_checkpoint(path)
    state = checkpoint.state_dict
    size = sum(t.numel() * t.element_size() for t in state.values())
    log.info("read %s: %d tensors, %.2f GB in %.1f s", ", ".join(p.name for p in checkpoint.source_files),
             len(state), size / 1e9, time.monotonic() - started)
    state = strip_prefixes(state)
    config = resolve_config(state, checkpoint.directory, preset, checkpoint.embedded_config)
    model = build_model(config, device="meta")
    state = strip_prefixes(checkpoint.state_dict, set(model.state_dict()))
    warnings = FAMILY_WARNINGS.get(config.family, lambda s: [])(state)
    prepare = getattr(model, "prepare_state_dict", None)
    if prepare is not None:
        state = prepare(state)
    assign_state_dict(model, state, dtype, device, source=", ".join(p.name for p in checkpoint.source_files))
    log.info("model %s ready: %s parameters, %s on %s, %.1f s", config.family,
             f"{sum(p.numel() for p in model.parameters()):,}", str(dtype).removeprefix("torch."), device,
             time.monotonic() - started)
    tokenizer_dir = checkpoint.directory if checkpoint.directory and (checkpoint.directory / "tokenizer.json").is_file() \
        else None
    return LoadedModel(model.eval(), config, warnings, tokenizer_dir)
