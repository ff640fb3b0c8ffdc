"""`--kv-cache-dtype` (server/executor/build.py): by default float16 on a CPU whose weights' formats
are chosen by speed, else the activations' dtype; 16-bit on a CPU when asked (twice the tokens in the
same memory); an engine over a 16-bit cache generates through the layers and through the one-call
decode step, staying close to the float32 cache."""
from __future__ import annotations

import asyncio

import pytest
import torch

from model.families import custom_llm_cpu_step
from model.layers import integer_dot
from server.cli.main import build_parser
from server.cli.serve import config_from_args
from server.config import ModelLoadConfig
from server.engine.request import GenerationRequest, SamplingParams
from server.executor.build import build_engine, resolve_cache_dtype
from tests.api_server import make_tiny_checkpoint, tiny_server_config
from tests.helpers import collect

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_cache_dtype_resolves():
    assert resolve_cache_dtype("auto", torch.float32, CPU) == torch.float32               # --dtype float32: exact
    assert resolve_cache_dtype("auto", torch.float32, CPU, "measured") == torch.float16   # --dtype auto
    assert resolve_cache_dtype("auto", torch.float32, CPU, "lean") == torch.float16       # --quantization int4
    assert resolve_cache_dtype("auto", torch.bfloat16, CPU, "exact") == torch.bfloat16    # --dtype mixed
    assert resolve_cache_dtype("auto", torch.bfloat16, CUDA) == torch.bfloat16
    assert resolve_cache_dtype("float32", torch.float32, CPU, "measured") == torch.float32
    assert resolve_cache_dtype("float16", torch.float32, CPU) == torch.float16
    assert resolve_cache_dtype("bfloat16", torch.bfloat16, CUDA) == torch.bfloat16      # the model's own
    with pytest.raises(ValueError, match="only on the CPU"):
        resolve_cache_dtype("float16", torch.bfloat16, CUDA)
    with pytest.raises(ValueError, match="choose one of auto, float32, bfloat16, float16"):
        resolve_cache_dtype("int8", torch.float32, CPU)


def test_serve_flag():
    assert ModelLoadConfig().kv_cache_dtype == "auto"
    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "float16"])
    assert config_from_args(args).model.kv_cache_dtype == "float16"
    with pytest.raises(ValueError, match="--kv-cache-dtype 'fp8'"):
        config_from_args(build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8"]))


def _greedy(tmp_path, quantization: str, kv_cache_dtype: str):
    """The engine, and the greedy tokens of two prompts decoded together (custom-llm-tiny with a
    latent of 32, which the one-call step's products need)."""
    config = tiny_server_config(make_tiny_checkpoint(tmp_path, 0, "latent_dim=32"))
    config = config.__class__(model=ModelLoadConfig(**{**config.model.__dict__, "quantization": quantization,
                                                       "kv_cache_dtype": kv_cache_dtype}),
                              engine=config.engine, api=config.api)
    engine = build_engine(config)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [[5, 70, 263, 9, 120, 44, 17], [300, 2, 91]]

    async def run():
        return await asyncio.gather(*(collect(engine, GenerationRequest(f"r{i}", p, params))
                                      for i, p in enumerate(prompts)))
    try:
        results = asyncio.run(run())
    finally:
        engine.stop()
    return engine, [tokens for _, _, tokens in results]


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_a_16_bit_cache_generates_close_to_a_float32_one(tmp_path, quantization):
    """int4: the custom-llm model's decode steps in one call (where this CPU has the step), over
    the cache's 16-bit rows."""
    exact, exact_tokens = _greedy(tmp_path, quantization, "float32")
    half, half_tokens = _greedy(tmp_path, quantization, "float16")
    assert exact.cache.dtype == torch.float32 and half.cache.dtype == torch.float16
    if quantization == "int4" and custom_llm_cpu_step._kernel() is not None and integer_dot.has_vnni():
        assert half.model.cpu_decode_step is not None
    assert half.cache.num_blocks >= 2 * exact.cache.num_blocks - 1                # the same memory, twice the rows
    assert [len(t) for t in half_tokens] == [10, 10]
    # float16 keys and values round at ~5e-4 relative: the greedy path of a random tiny model may
    # part at a near tie, but not from the first token on
    assert all(a[:3] == b[:3] for a, b in zip(exact_tokens, half_tokens))
