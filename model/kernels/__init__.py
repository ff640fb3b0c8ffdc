"""Triton kernels for the GPU fast path. Each has a PyTorch reference in the model code it replaces,
and is tested against it on the CPU under TRITON_INTERPRET=1 (tests/test_triton_mla_decode.py)."""


def use_triton_decode_attention(model) -> int:
    """Route the decode-only steps of every attention layer of `model` that names a kernel
    (`DECODE_KERNEL`: MLA or grouped-query) through it; returns how many layers now use one."""
    from model.kernels.paged_gqa_decode import paged_gqa_decode
    from model.kernels.paged_mla_decode import paged_mla_decode

    kernels = {"paged_mla_decode": paged_mla_decode, "paged_gqa_decode": paged_gqa_decode}
    layers = 0
    for module in model.modules():
        name = getattr(module, "DECODE_KERNEL", None)
        if name is not None:
            module.decode_attention = kernels[name]
            layers += 1
    return layers


def decodes_through_kernels(model) -> bool:
    """Every attention layer of `model` runs its decode steps in a kernel (so a decode batch needs
    no gather-path tensors)."""
    attention = [m for m in model.modules() if hasattr(m, "decode_attention")]
    return bool(attention) and all(m.decode_attention is not None for m in attention)
