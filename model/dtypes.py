"""The one table of dtype names: what `--dtype` and `weights init --dtype` accept, and how many bytes
a value of each dtype takes (for cache sizes)."""
from __future__ import annotations

import torch

# name → dtype; the short aliases are the spellings other tools use
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    """The dtype a name stands for; ValueError naming the accepted names otherwise."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes one value of `dtype` takes."""
    return torch.empty((), dtype=dtype).element_size()
