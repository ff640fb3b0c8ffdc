"""How `build_engine` turns `--dtype` and `--quantization` into weights (server/executor/build.py):
exact float32 one flag away, `--quantization int8|int4` quantizing a float checkpoint at load in its
kernel's format only, `--dtype auto` on a CPU taking the formats measured fastest; the flag and its
environment variable."""
from __future__ import annotations

import pytest
import torch

from model.layers.linear import Linear
from model.layers.quantized_linear import DOT_FORMATS, QuantizedLinear
from server.cli.main import build_parser
from server.cli.serve import config_from_args
from server.config import ModelLoadConfig
from server.executor.build import build_engine, resolve_quantization, weight_format_mode
from tests.api_server import make_tiny_checkpoint, tiny_server_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_quantization_resolves_per_dtype_and_device():
    assert resolve_quantization("auto", "auto", CPU) == "auto"
    assert resolve_quantization("auto", "float32", CPU) == "none"            # exact float32 stays exact
    assert resolve_quantization("auto", "auto", CUDA) == "none"
    assert resolve_quantization("int4", "float32", CPU) == "int4"
    with pytest.raises(ValueError, match="CPU kernels"):
        resolve_quantization("int8", "auto", CUDA)
    with pytest.raises(ValueError, match="does not combine with --dtype mixed"):
        resolve_quantization("int4", "mixed", CPU)
    with pytest.raises(ValueError, match="choose auto, none, int8 or int4"):
        resolve_quantization("int3", "auto", CPU)
    assert weight_format_mode("auto", "auto", CPU) == "measured"
    assert weight_format_mode("auto", "int4", CPU) == "lean"
    assert weight_format_mode("float32", "int4", CPU) == "exact"
    assert weight_format_mode("auto", "none", CUDA) == "exact"


def test_serve_flag_and_environment(monkeypatch):
    args = build_parser().parse_args(["serve", "--quantization", "int4"])
    assert config_from_args(args).model.quantization == "int4"
    assert ModelLoadConfig().quantization == "auto" and ModelLoadConfig().dtype == "auto"
    monkeypatch.setenv("CUSTOMLLM_QUANTIZATION", "int8")
    assert config_from_args(build_parser().parse_args(["serve"])).model.quantization == "int8"
    with pytest.raises(ValueError, match="--quantization 'int3'"):
        config_from_args(build_parser().parse_args(["serve", "--quantization", "int3"]))


def _engine(tmp_path, **model_fields):
    config = tiny_server_config(make_tiny_checkpoint(tmp_path))
    config = config.__class__(model=ModelLoadConfig(**{**config.model.__dict__, **model_fields}),
                              engine=config.engine, api=config.api)
    return build_engine(config, start=False)


def _linears(model):
    return [m for m in model.modules() if isinstance(m, Linear)]


def test_float32_is_exact(tmp_path):
    engine = _engine(tmp_path, dtype="float32")
    model = engine.model
    assert engine.cache.dtype == torch.float32
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert all(m.weight.dtype == torch.float32 for m in _linears(model))


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantization_flag_quantizes_a_float_checkpoint(tmp_path, kind):
    engine = _engine(tmp_path, dtype="auto", quantization=kind)
    quantized = [m for m in engine.model.modules() if isinstance(m, QuantizedLinear) and m.values == kind]
    assert quantized and all(m.formats in ((kind,), (DOT_FORMATS[kind],)) for m in quantized)   # lean: a kernel's
    assert engine.cache.dtype == torch.float16                 # float32 activations, a float16 cache by default
    with torch.no_grad():
        assert torch.isfinite(engine.model.forward_full(torch.tensor([[5, 70, 263, 9]]))).all()


def test_auto_takes_measured_formats(tmp_path):
    """Which format wins depends on the machine; every Linear is float32 or a measured format of
    float values, and the model still computes."""
    engine = _engine(tmp_path, dtype="auto")
    for m in _linears(engine.model):
        assert not isinstance(m, QuantizedLinear) or (m.values == "float" and set(m.formats) <= {"float32", "bfloat16"})
    with torch.no_grad():
        assert torch.isfinite(engine.model.forward_full(torch.tensor([[5, 70, 263, 9]]))).all()


def test_int4_at_load_joins_projections_and_keeps_the_tokens(tmp_path):
    """`--quantization int4` joins the quantized projections of one input (experts' gate|up, the
    attention's); the engine's model gives the logits, and so the greedy tokens, of the same
    checkpoint quantized with every projection on its own."""
    from model.loading.loader import load_model
    from model.layers.quantized_linear import quantize_model, replace_module
    engine = _engine(tmp_path, dtype="auto", quantization="int4")
    joined = engine.model
    expert = joined.decoder_layers[0].mlp.moe.routed_experts[2]
    assert isinstance(expert.gate_up_proj, QuantizedLinear) and not hasattr(expert, "gate_proj")
    separate = load_model(make_tiny_checkpoint(tmp_path), dtype=torch.float32).model.eval()
    quantize_model(separate, "int4")
    for name, module in joined.named_modules():      # the float layers in the formats the engine measured
        if isinstance(module, QuantizedLinear) and module.values == "float":
            layer = separate.get_submodule(name)
            replace_module(separate, name, QuantizedLinear.from_weight(layer.weight, layer.bias, module.small_format,
                                                                       module.large_format))
    def greedy(model, steps: int = 6) -> tuple[list[int], torch.Tensor]:
        ids = [5, 70, 263, 9]
        for _ in range(steps):
            logits = model.forward_full(torch.tensor([ids]))[0]                    # [T, V]
            ids.append(int(logits[-1].argmax()))
        return ids, logits

    one_format_per_values(joined, separate)
    from model.layers.cpu_layout import use_column_major_weights
    use_column_major_weights(separate)                # the engine's float32 layout (MKL sums differ by layout)
    with torch.no_grad():
        (joined_ids, joined_logits), (separate_ids, separate_logits) = greedy(joined), greedy(separate)
    assert joined_ids == separate_ids and torch.equal(joined_logits, separate_logits)


def one_format_per_values(*models) -> None:
    """Every int4 / int8 layer of the models in the format the first model's first layer of those
    values measured fastest (shapes differ once joined, and so may their measured formats)."""
    from model.layers.quantized_linear import replace_module
    chosen: dict[str, str] = {}
    for model in models:
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLinear) and module.values != "float":
                fmt = chosen.setdefault(module.values, module.small_format)
                replace_module(model, name, module.with_formats(fmt, fmt))
