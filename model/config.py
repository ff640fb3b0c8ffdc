"""Model configurations: one frozen dataclass per family, presets, and `config.json` parsing.

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


@dataclass(frozen=True)
class CustomLLMConfig(BaseModelConfig):
    """CustomLLM-973M (ARCHITECTURES.md §1): MLA with a 192-wide latent, DeepSeek-style MoE."""

    family: ClassVar[str] = "custom_llm"
    vocab_size: int = 49152
    hidden_size: int = 768
    num_layers: int = 30
    num_heads: int = 12
    head_dim: int = 64
    max_context: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    latent_dim: int = 192
    rope_dim: int = 32
    num_shared_experts: int = 1
    num_routed_experts: int = 7
    expert_hidden: int = 1536
    top_k_experts: int = 2
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def cache_row_width(self) -> int:
        # [c_kv | post-RoPE k_rope of every head]
        return self.latent_dim + self.num_heads * self.rope_dim


PRESETS: dict[str, BaseModelConfig] = {
    "custom-llm-973m": CustomLLMConfig(),
    "custom-llm-tiny": CustomLLMConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, max_context=256,
        latent_dim=16, rope_dim=8, num_shared_experts=1, num_routed_experts=7, expert_hidden=32,
        top_k_experts=2,
    ),
}

CONFIG_CLASSES: dict[str, type[BaseModelConfig]] = {"custom_llm": CustomLLMConfig}


def register_family(config_cls: type[BaseModelConfig], presets: dict[str, BaseModelConfig]) -> None:
    """Families defined in their own modules add their config class and presets here."""
    CONFIG_CLASSES[config_cls.family] = config_cls
    PRESETS.update(presets)


# modules that register more families (and their presets) when imported
FAMILY_MODULES = ("model.families.llama", "model.families.shomsher", "model.families.smart_llm")


def load_families() -> None:
    import importlib
    for module in FAMILY_MODULES:
        importlib.import_module(module)


def preset(name: str) -> BaseModelConfig:
    if name not in PRESETS:
        load_families()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


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
    family = data.get("family", "custom_llm")
    if family not in CONFIG_CLASSES:
        load_families()
    if family not in CONFIG_CLASSES:
        raise ValueError(f"{path}: unknown model family {family!r}; known: {', '.join(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[family].from_dict(data)
