"""Triton kernels for the GPU fast path. Each has a PyTorch reference in the model code it replaces,
and is tested against it on the CPU under TRITON_INTERPRET=1 (tests/test_triton_mla_decode.py)."""


def use_triton_decode_attention(model) -> int:
    """Route the decode-only steps of every MLA layer of `model` through the Triton kernel; returns
    how many layers now use it (0 for families without MLA)."""
    from model.kernels.paged_mla_decode import paged_mla_decode

    layers = 0
    for module in model.modules():
        if hasattr(module, "decode_attention"):
            module.decode_attention = paged_mla_decode
            layers += 1
    return layers
