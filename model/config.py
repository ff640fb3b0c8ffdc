"""Model configurations: the base every family's frozen config dataclass extends, preset lookup, and
`config.json` parsing. The config classes and presets themselves live with their families
(model/families/<name>.py) and are found through their records (model/registry.py).

Every family config answers the same questions the rest of the server asks of a model:
its family name, vocabulary, layer count, context limit, the width of one cache row per layer
(`cache_row_width`) and its special token ids.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from model.registry import families, presets


@dataclass(frozen=True)
class BaseModelConfig:
    """Fields common to every family; subclasses add their own and set `family`."""

    family: ClassVar[str] = ""
    vocab_size: int = 0
    hidden_size: int = 0
    num_layers: int = 0
    max_context: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def cache_row_width(self) -> int:
        """Values one token keeps in the cache, per layer."""
        raise NotImplementedError

    def cache_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.num_layers * self.cache_row_width * dtype_bytes

    def replace(self, **overrides: Any) -> "BaseModelConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known and k not in ("family", "preset"))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config field(s) {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})


def preset(name: str) -> BaseModelConfig:
    known = presets()
    if name not in known:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(known))}")
    return known[name]


def config_from_json(path: str | Path, base: BaseModelConfig | None = None) -> BaseModelConfig:
    """Read a `config.json`: `{"preset": NAME}` selects a preset, other fields override it.

    Without a preset, `"family"` (default `custom_llm`) picks the class and the fields fill it.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config.json must hold a JSON object")
    if "preset" in data:
        base = preset(data["preset"])
    if base is not None:
        family = data.get("family", base.family)
        if family != base.family:
            raise ValueError(f"{path}: family {family!r} does not match preset family {base.family!r}")
        return base.from_dict({**dataclasses.asdict(base), **data})
    name = data.get("family", "custom_llm")
    known = families()
    if name not in known:
        raise ValueError(f"{path}: unknown model family {name!r}; known: {', '.join(known)}")
    return known[name].config_class.from_dict(data)
