"""The one dtype-name table (model/dtypes.py) that `serve --dtype` and `weights init --dtype` read."""
from __future__ import annotations

import pytest
import torch

from model.dtypes import DTYPES, dtype_bytes, parse_dtype


def test_names_and_aliases():
    assert parse_dtype("float32") is parse_dtype("fp32") is torch.float32
    assert parse_dtype("bfloat16") is parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float16") is parse_dtype("fp16") is torch.float16
    assert set(DTYPES.values()) == {torch.float32, torch.bfloat16, torch.float16}


def test_an_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dtype 'int8'; choose one of bf16, bfloat16, float16"):
        parse_dtype("int8")


def test_bytes_per_value():
    assert [dtype_bytes(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [4, 2, 2]
