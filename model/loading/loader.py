"""Checkpoint → ready model: the config (preset, `config.json` beside it, a config carried inside,
or inference from the tensors), the module tree on the meta device, strict assignment.

What differs between families (how to recognise their keys, infer or read their config, what to
warn about, how to prepare the state dict) is asked of their `FamilyRecord` (model/registry.py);
nothing here names a family.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.config import BaseModelConfig, config_from_json, preset as named_preset
from model.loading.checkpoint import read_checkpoint, strip_prefixes
from model.loading.state_dict import CheckpointError, assign_state_dict
from model.registry import FamilyRecord, build_model, families, family

log = logging.getLogger("customllm.loader")


@dataclass
class LoadedModel:
    model: nn.Module
    config: BaseModelConfig
    warnings: list[str] = field(default_factory=list)
    tokenizer_dir: Path | None = None


def detect_family(state: dict[str, torch.Tensor]) -> FamilyRecord:
    """The family whose marker keys the checkpoint has; every family may first refuse it."""
    known = families().values()
    for record in known:
        if record.check_checkpoint is not None:
            record.check_checkpoint(state)
    for record in known:
        if any(marker in state for marker in record.markers):
            return record
    sample = ", ".join(sorted(state)[:3])
    raise CheckpointError(f"cannot tell which model family this checkpoint is (first keys: {sample}); "
                          "pass --preset NAME or put a config.json beside it")


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
    record = detect_family(state)
    if embedded is not None:
        if record.config_from_embedded is None:
            raise CheckpointError(f"the checkpoint carries a config, but the {record.name} family does not read one")
        return record.config_from_embedded(embedded, state)
    if record.infer_config is None:
        raise CheckpointError(f"a {record.name} checkpoint does not show its full configuration; "
                              "pass --preset NAME or put a config.json beside it")
    return record.infer_config(state)


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
    record = family(config.family)
    warnings = record.warnings(state) if record.warnings is not None else []
    if record.prepare_state_dict is not None:
        state = record.prepare_state_dict(state)
    assign_state_dict(model, state, dtype, device, source=", ".join(p.name for p in checkpoint.source_files))
    log.info("model %s ready: %s parameters, %s on %s, %.1f s", config.family,
             f"{sum(p.numel() for p in model.parameters()):,}", str(dtype).removeprefix("torch."), device,
             time.monotonic() - started)
    tokenizer_dir = checkpoint.directory if checkpoint.directory and (checkpoint.directory / "tokenizer.json").is_file() \
        else None
    return LoadedModel(model.eval(), config, warnings, tokenizer_dir)
