"""The Llama MLP keeps its intermediate in 16 bits where both products take 16-bit inputs at that
many rows (bfloat16 copies for prompt chunks): the down projection is handed bfloat16, the output
stays within bfloat16's rounding of the float32 intermediate's (its very rounding where SwiGLU runs in
C), and other formats keep float32."""
from __future__ import annotations

import torch

from model.config import preset
from model.layers import prompt_ops
from model.layers.quantized_linear import BFLOAT16, INT4, INT4_DOT, QuantizedLinear, quantize_model, replace_module
from tests.helpers import perturbed_model


def mlp_in(small: str, large: str):
    model = perturbed_model(preset("llama-tiny"), seed=4, std=0.2).eval()
    quantize_model(model, INT4)
    mlp = model.model.layers[0].mlp
    for name in ("gate_up_proj", "down_proj"):
        replace_module(mlp, name, getattr(mlp, name).with_formats(small, large))
    return mlp


def down_input_dtype(mlp, x: torch.Tensor) -> tuple[torch.dtype, torch.Tensor]:
    seen = []
    handle = mlp.down_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    try:
        with torch.inference_mode():
            out = mlp(x)
    finally:
        handle.remove()
    return seen[0], out


def test_prompt_rows_stay_16_bit_between_the_products():
    mlp = mlp_in(INT4_DOT, BFLOAT16)
    x = torch.randn(70, mlp.down_proj.out_features, generator=torch.Generator().manual_seed(0))   # > 64 rows
    dtype, out = down_input_dtype(mlp, x)
    assert dtype == torch.bfloat16 and out.dtype == torch.float32
    with torch.inference_mode():                      # the float32 intermediate, rounded at down's input
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        want = mlp.down_proj(torch.nn.functional.silu(gate) * up)
    # SwiGLU in C (model/layers/prompt_ops.py) rounds the float32 intermediate (within 2e-4 of it) once, as
    # down's input cast does; PyTorch's bfloat16 ops round twice
    tolerance = 0.002 if prompt_ops.available(x.bfloat16()) else 0.02
    assert float((out - want).abs().max()) <= tolerance * float(want.abs().max())


def test_other_formats_keep_a_float32_intermediate():
    mlp = mlp_in(INT4_DOT, BFLOAT16)
    x = torch.randn(3, mlp.down_proj.out_features)                                # ≤ 4 rows: int4-dot
    assert down_input_dtype(mlp, x)[0] == torch.float32
    float_mlp = perturbed_model(preset("llama-tiny"), seed=4).model.layers[0].mlp
    assert not isinstance(float_mlp.down_proj, QuantizedLinear)
    assert down_input_dtype(float_mlp, torch.randn(70, float_mlp.down_proj.out_features))[0] == torch.float32
