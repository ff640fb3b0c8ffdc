"""Mixture-of-experts building blocks: the SwiGLU expert, routing tokens over experts
(`route_to_experts`, the `RoutedExperts` mixin) and the model-level switch to sync-free routing
(`use_sync_free_moe`) that CUDA-graph capture needs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.linear import FusableProjections, Linear


class SwiGLUExpert(FusableProjections, nn.Module):
    """`down(silu(gate(x)) · up(x))` with the names of the CustomLLM checkpoint; quantized, gate and
    up may run as one product (`gate_up_proj`, see FusableProjections)."""

    FUSABLE = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project("gate_up_proj", x)                                    # [T, hidden] each
        return self.down_proj(F.silu(gate) * up)


SYNC_FREE_MAX_TOKENS = 256   # the largest decode batch captured in a CUDA graph


def route_to_experts(x: torch.Tensor, top_w: torch.Tensor, top_e: torch.Tensor, experts) -> torch.Tensor:
    """Σ_j top_w[t, j] · experts[top_e[t, j]](x_t): x [T, d], top_w/top_e [T, k] → [T, d] in the
    dtype of x · top_w. Each expert that received tokens runs once over them, its tokens in order,
    the experts in index order; the routes are read to the host once (one sync). One token runs its
    k experts on x itself and adds their outputs (no index tensors, the same sums in the same order)."""
    routes = top_e.tolist()                                                          # [T][k]: the host read
    if len(routes) == 1:
        out = None
        for slot in sorted(range(len(routes[0])), key=routes[0].__getitem__):        # expert order
            y = experts[routes[0][slot]](x) * top_w[:, slot, None]                   # [1, d]
            out = y if out is None else out + y
        return out
    tokens: list[list[int]] = [[] for _ in experts]
    slots: list[list[int]] = [[] for _ in experts]
    for t, row in enumerate(routes):
        for slot, e in enumerate(row):
            tokens[e].append(t)
            slots[e].append(slot)
    out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, top_w.dtype), device=x.device)
    for e, token_list in enumerate(tokens):
        if token_list:
            token_idx = torch.tensor(token_list, device=x.device)                    # [n]
            slot = torch.tensor(slots[e], device=x.device)                           # [n]
            out.index_add_(0, token_idx, experts[e](x[token_idx]) * top_w[token_idx, slot, None])  # [n, d]
    return out


class RoutedExperts:
    """Mixin for a MoE module holding `routed_experts` (SwiGLU modules whose gate, up and down
    projections are named by EXPERT_WEIGHTS): `routed(x, top_w, top_e)` is Σ_j top_w[t, j] ·
    expert_{top_e[t, j]}(x_t). Call `init_routing()` in `__init__`.

    By default only experts that received tokens run, each over its own tokens (counting them needs
    a host sync). `use_sync_free_routing` switches steps of up to SYNC_FREE_MAX_TOKENS tokens (decode
    steps) to static shapes and no host syncs, so they can be captured in a CUDA graph: the experts'
    weights become views of stacked [E, ...] tensors (no copy kept); tiny batches gather the routed
    experts' weights; larger ones use `grouped_gemm` (model.kernels.grouped_moe.grouped_moe, GEMMs over
    the routed pairs only) or, without it, every expert weighted by its routing weight (zero when not
    routed). Bigger steps (prefill) keep the per-expert loop."""

    EXPERT_WEIGHTS: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def init_routing(self) -> None:
        self.sync_free = False
        self.grouped_gemm = None

    @torch.no_grad()
    def use_sync_free_routing(self, grouped_gemm=None) -> None:
        """Call once the model is on its device (the stacked tensors are plain attributes)."""
        if any(getattr(e, "fused_sizes", None) for e in self.routed_experts):
            raise ValueError("sync-free routing stacks the experts' separate float weights; these are joined "
                             "quantized ones (a CPU form)")
        stacked = []
        for name in self.EXPERT_WEIGHTS:
            projections: list[Linear] = [getattr(e, name) for e in self.routed_experts]
            weights = torch.stack([p.dense_weight() for p in projections])             # [E, out, in]
            for index, projection in enumerate(projections):
                projection.keep_weight_in(weights[index])                             # a view, no copy kept
            stacked.append(weights)
        self._stacked_gate, self._stacked_up, self._stacked_down = stacked
        self.grouped_gemm = grouped_gemm
        self.sync_free = True

    def routed(self, x: torch.Tensor, top_w: torch.Tensor, top_e: torch.Tensor) -> torch.Tensor:
        """x [T, d], top_w/top_e [T, k] (weights in x's dtype) → [T, d]."""
        if self.sync_free and x.shape[0] <= SYNC_FREE_MAX_TOKENS:
            return self._routed_sync_free(x, top_w, top_e)
        return route_to_experts(x, top_w, top_e, self.routed_experts)

    def _routed_sync_free(self, x: torch.Tensor, top_w: torch.Tensor, top_e: torch.Tensor) -> torch.Tensor:
        gate, up, down = self._stacked_gate, self._stacked_up, self._stacked_down
        num_tokens, k = top_e.shape
        if num_tokens * k <= len(self.routed_experts):
            # tiny batch: read only the routed experts' weights
            routes = top_e.flatten()                                                   # [T*k]
            xr = x.repeat_interleave(k, dim=0)[:, :, None]                              # [T*k, d, 1]
            hidden = F.silu(torch.bmm(gate[routes], xr)) * torch.bmm(up[routes], xr)   # [T*k, h, 1]
            y = torch.bmm(down[routes], hidden)[:, :, 0] * top_w.flatten()[:, None]    # [T*k, d]
            return y.view(num_tokens, k, -1).sum(dim=1)
        if self.grouped_gemm is not None:
            return self.grouped_gemm(x, top_w, top_e, gate, up, down)
        weights = torch.zeros(num_tokens, len(self.routed_experts), dtype=x.dtype, device=x.device)
        weights.scatter_(1, top_e, top_w)                                              # [T, E]
        hidden = F.silu(torch.einsum("td,ehd->eth", x, gate)) * torch.einsum("td,ehd->eth", x, up)
        y = torch.einsum("eth,edh->etd", hidden, down)                                 # [E, T, d]
        return torch.einsum("etd,te->td", y, weights)


def use_sync_free_moe(model: nn.Module, grouped_gemm=None) -> int:
    """Switch every MoE of `model` that can to sync-free routing (with the Triton grouped GEMM
    `model.kernels.grouped_moe.grouped_moe` for batches past the gathered form); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    for moe in layers:
        moe.use_sync_free_routing(grouped_gemm=grouped_gemm)
    return len(layers)


def routes_sync_free(model: nn.Module) -> bool:
    """Every MoE of `model` with routed experts routes without host syncs (True when it has none)."""
    return all(m.sync_free for m in model.modules() if isinstance(m, RoutedExperts))
