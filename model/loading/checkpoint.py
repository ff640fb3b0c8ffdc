"""Reading checkpoints into a flat state dict without running any pickled code.

Accepted: `.safetensors` (one file, or shards with an index), `.pt`/`.pth`/`.bin` through
`torch.load(weights_only=True)` (wrappers `model_state_dict` / `state_dict`), or a directory holding
either (a Hugging Face Trainer checkpoint). Trainer state beside the weights (optimizer, scheduler,
rng state, training arguments) is never opened. A pickle that holds anything but tensors and plain
containers is refused, except for allow-listed configuration classes read through stand-ins
(SmartLLM's `config.ModelConfig`), which come back as plain dicts.
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.loading.state_dict import CheckpointError

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
TRAINER_STATE = re.compile(r"^(optimizer|scheduler|scaler|rng_state.*|training_args|trainer_state)\.(pt|pth|bin|json)$")
WRAPPERS = ("model_state_dict", "state_dict", "model")
PREFIXES = ("_orig_mod.", "module.")


class PickledConfigStandIn:
    """Receives the fields of an allow-listed pickled config object (NEWOBJ + BUILD), nothing else."""

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("an allow-listed config object carried a non-dict state")
        self.__dict__.update(state)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _stand_in(qualified_name: str) -> type:
    return type(qualified_name.rsplit(".", 1)[-1], (PickledConfigStandIn,), {})


# qualified names of config classes that may appear pickled inside a checkpoint
ALLOWED_PICKLED_CONFIGS = ("config.ModelConfig",)


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    embedded_config: dict | None = None
    source_files: list[Path] = field(default_factory=list)
    directory: Path | None = None


def _load_pickle(path: Path):
    stand_ins = [(_stand_in(name), name) for name in ALLOWED_PICKLED_CONFIGS]
    try:
        with torch.serialization.safe_globals(stand_ins):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc) and "zip" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a pickled {found.group(1)} object" if found else "pickled objects"
        raise CheckpointError(
            f"{path.name}: refused: it holds {what}, and only tensors and plain containers (dict, list, "
            f"numbers, strings) may be loaded; unpickling anything else could run code. Re-save the "
            f"weights as safetensors or as a plain state dict.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{str(exc).splitlines()[0]}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name}: not a readable safetensors file (truncated or corrupt?): "
                              f"{str(exc).splitlines()[0]}") from None


def _read_index(path: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path.name}: not a valid shard index: {exc}") from None
    state: dict[str, torch.Tensor] = {}
    shards = sorted({path.parent / shard for shard in weight_map.values()})
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{path.name} names shard {shard.name}, which is missing")
        state.update(_read_file(shard)[0])
    return state, shards


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path), None
    if path.name.endswith(".index.json"):
        return _read_index(path)[0], None
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _unwrap(_load_pickle(path), path)
    raise CheckpointError(f"{path.name}: unknown checkpoint format (expected .safetensors, .pt, .pth or .bin)")


def _unwrap(obj, path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The state dict inside a saved object, and an embedded config if one travelled with it."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: holds a {type(obj).__name__}, not a state dict")
    config = obj.get("config")
    config = config.as_dict() if isinstance(config, PickledConfigStandIn) else (
        config if isinstance(config, dict) else None)
    for wrapper in WRAPPERS:
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path.name}: no tensors found (expected a state dict, or one under "
                              f"{' / '.join(WRAPPERS)})")
    return tensors, config


def strip_prefixes(state: dict[str, torch.Tensor], model_keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Remove `_orig_mod.` / `module.` (torch.compile, DDP) and, when the model's own keys do not
    start with it, `model.`, wherever every key carries the prefix."""
    prefixes = PREFIXES + (("model.",) if model_keys is None or not all(k.startswith("model.") for k in model_keys)
                           else ())
    changed = True
    while changed and state:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def find_weight_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".pt", ".pth", ".bin")
                        and not TRAINER_STATE.match(p.name))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(f"{directory}: no weights found (model.safetensors, pytorch_model.bin, *.pt, …)")
    raise CheckpointError(f"{directory}: several candidate weight files ({', '.join(p.name for p in candidates)}); "
                          f"pass the file itself as --model")


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    directory = path if path.is_dir() else path.parent
    weight_file = find_weight_file(path) if path.is_dir() else path
    if weight_file.name.endswith(".index.json"):
        state, files = _read_index(weight_file)
        return Checkpoint(state, None, files, directory)
    state, config = _read_file(weight_file)
    return Checkpoint(state, config, [weight_file], directory)
