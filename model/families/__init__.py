"""The one list of model families. Adding a family is one module here (its config class, module
classes and `FAMILY` record) and one line below."""
from __future__ import annotations

from model.families import custom_llm, llama, shomsher, smart_llm
from model.registry import FamilyRecord

FAMILIES: tuple[FamilyRecord, ...] = (
    custom_llm.FAMILY,
    llama.FAMILY,
    shomsher.FAMILY,
    smart_llm.FAMILY,
)
