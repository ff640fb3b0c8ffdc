"""The Triton grouped-GEMM MoE against a per-pair float64 reference, in Triton's interpreter on the
CPU (natively on a GPU), and through DeepSeekMoE's sync-free routing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="pip install triton (interprets on the CPU)")

from model.config import preset  # noqa: E402
from model.kernels.grouped_moe import grouped_moe, sort_pairs_by_expert  # noqa: E402
from tests.helpers import perturbed_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, top_w, top_e, gate, up, down):
    x, gate, up, down, top_w = (t.double() for t in (x, gate, up, down, top_w))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_e.shape[1]):
            e = int(top_e[t, j])
            out[t] += top_w[t, j] * (down[e] @ (F.silu(gate[e] @ x[t]) * (up[e] @ x[t])))
    return out


def case(num_tokens, experts=7, k=2, dim=64, hidden=32, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, dim, generator=gen)
    top_e = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(num_tokens)])
    top_w = torch.rand(num_tokens, k, generator=gen)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    gate, up = (torch.randn(experts, hidden, dim, generator=gen) / dim ** 0.5 for _ in range(2))
    down = torch.randn(experts, dim, hidden, generator=gen) / hidden ** 0.5
    return [t.to(dtype) if t.is_floating_point() else t for t in (x, top_w, top_e, gate, up, down)]


@pytest.mark.parametrize("num_tokens", [1, 3, 16, 37])
def test_grouped_moe_equals_the_per_pair_reference(num_tokens):
    args = case(num_tokens, seed=num_tokens)
    got = grouped_moe(*(a.to(DEVICE) for a in args)).cpu()
    want = reference(*args)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), (got.double() - want).abs().max()


def test_shapes_off_the_tiles_with_one_expert_taking_most_pairs():
    args = case(4, dim=96, hidden=200, seed=9)      # neither a multiple of BLOCK_K nor of BLOCK_N
    args[2] = torch.tensor([[3, 0], [3, 1], [3, 6], [2, 3]])                       # expert 3: 4 pairs
    got = grouped_moe(*(a.to(DEVICE) for a in args)).cpu()
    assert torch.allclose(got.double(), reference(*args), rtol=1e-4, atol=1e-4)


def test_grouped_moe_in_float16():
    args = case(10, seed=3, dtype=torch.float16)
    got = grouped_moe(*(a.to(DEVICE) for a in args)).cpu()
    assert torch.allclose(got.double(), reference(*args), rtol=5e-3, atol=5e-3)


def test_sorting_pairs_by_expert_pads_each_run():
    top_e = torch.tensor([[2, 0], [2, 5], [0, 2]])                                 # 6 pairs
    pairs, block_expert = sort_pairs_by_expert(top_e, num_experts=7, block_m=4)
    assert pairs.numel() == -(-(6 + 7 * 3) // 4) * 4                               # fixed by T, k, E
    runs = {int(block_expert[b]): pairs[b * 4:(b + 1) * 4].tolist() for b in range(len(block_expert))
            if int(block_expert[b]) < 7}
    assert runs == {0: [1, 4, 6, 6], 2: [0, 2, 5, 6], 5: [3, 6, 6, 6]}             # 6 = padding
    assert (block_expert[len(runs):] == 7).all()                                   # idle blocks last


@pytest.mark.parametrize("name", ["custom-llm-tiny", "smart-llm-tiny"])
@pytest.mark.parametrize("num_tokens", [2, 24])        # the gathered form, then the kernel
def test_sync_free_moe_equals_the_per_expert_loop(name, num_tokens):
    model = perturbed_model(preset(name), seed=2).to(DEVICE)
    moe = next(m for m in model.modules() if hasattr(m, "routed_experts"))
    x = torch.randn(num_tokens, preset(name).hidden_size, device=DEVICE)
    with torch.no_grad():
        expected = moe(x)
        moe.use_sync_free_routing(grouped_gemm=grouped_moe)
        got = moe(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_grouped_moe_bf16_on_the_gpu_at_batch_256():
    args = case(256, dim=768, hidden=1536, seed=5, dtype=torch.bfloat16)
    got = grouped_moe(*(a.to("cuda") for a in args)).float().cpu()
    assert torch.allclose(got.double(), reference(*args), rtol=3e-2, atol=3e-2)
