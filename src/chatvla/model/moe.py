"""The mixture-of-experts MLP that replaces each Qwen2-VL decoder MLP.

Parameter layout (what a checkpoint stores, and what the vLLM model's FusedMoE loads; see
src/chatvla/engines/vllm_plugin/):

    mlp.gate.weight (+ .bias)      [E, H]      router (dynamic MoE only)
    mlp.experts.gate_up_proj       [E, 2I, H]  gate rows first, then up rows (== FusedMoE w13)
    mlp.experts.down_proj          [E, H, I]   (== FusedMoE w2)
    mlp.shared_expert.{gate,up,down}_proj.weight   all shared experts fused into one MLP

Several shared experts summed together equal one MLP whose intermediate layer is their
concatenation, so they are stored fused (intermediate = num_shared * I), as DeepSeek does.

Routing: softmax over the kept top-k logits. That equals "softmax over all experts, keep top-k,
renormalise", which is what vLLM's FusedMoE computes with `renormalize=True`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chatvla.model.config import MoEConfig


class DenseMLP(nn.Module):
    """Qwen2's SwiGLU MLP; the parameter names match transformers' Qwen2MLP."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FusedExperts(nn.Module):
    """E SwiGLU experts stored as two stacked tensors."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate = intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def load_dense(self, mlp: nn.Module) -> None:
        """Start every expert as a copy of a dense Qwen2 MLP (dense -> MoE conversion)."""
        with torch.no_grad():
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
            self.gate_up_proj.copy_(gate_up.unsqueeze(0).expand_as(self.gate_up_proj))
            self.down_proj.copy_(mlp.down_proj.weight.unsqueeze(0).expand_as(self.down_proj))


# Up to this many tokens, every routed expert runs on every token (two batched products) and the router's
# weights, zero outside each token's top-k, combine them. A decode step carries one token per robot; there
# the per-expert bookkeeping of the gather path (unique, nonzero, index_add per chosen expert) costs about
# what the products it skips would (benchmarks/model_cpu.py --moe-path both). Larger calls (prefill,
# training) gather. Both give the same outputs (tested).
DENSE_ROUTING_MAX_TOKENS = 16


class MoEBlock(nn.Module):
    """Drop-in for a decoder layer's `mlp`: [B, S, H] -> [B, S, H].

    For a static MoE (ChatVLA v1) the caller sets `route_by_task` to a LongTensor [B] of expert
    indices before the forward pass; every token of row b then goes through expert route_by_task[b].
    """

    def __init__(self, hidden: int, intermediate: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        inter = cfg.expert_intermediate_size or intermediate
        self.static = cfg.kind == "static"
        self.top_k = cfg.top_k
        if not self.static:
            self.gate = nn.Linear(hidden, cfg.num_experts, bias=cfg.router_bias)
        self.experts = FusedExperts(cfg.num_experts, hidden, inter)
        self.shared_expert = (
            DenseMLP(hidden, inter * cfg.num_shared_experts)
            if cfg.kind == "dynamic" and cfg.num_shared_experts > 0
            else None
        )
        self.route_by_task: torch.Tensor | None = None
        self.last_routing: torch.Tensor | None = None  # [tokens, top_k] expert ids of the last call (tests)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static:
            return self._forward_static(x)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.gate(flat)
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32).to(flat.dtype)
        self.last_routing = top_idx.detach()
        if flat.shape[0] <= DENSE_ROUTING_MAX_TOKENS:
            out = self._all_experts(flat, torch.zeros_like(logits).scatter(1, top_idx, weights))
        else:
            out = self._chosen_experts(flat, top_idx, weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.reshape(shape)

    def _all_experts(self, flat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[T, H] tokens through all E experts, combined by [T, E] weights (zero off the top-k)."""
        gate, up = torch.einsum("th,eih->eti", flat, self.experts.gate_up_proj).chunk(2, dim=-1)
        y = torch.einsum("eti,ehi->eth", F.silu(gate) * up, self.experts.down_proj)
        return torch.einsum("eth,te->th", y, weights)

    def _chosen_experts(self, flat: torch.Tensor, top_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[T, H] tokens gathered per chosen expert: each expert runs only on its tokens."""
        out = torch.zeros_like(flat)
        for e in torch.unique(top_idx).tolist():
            rows, slot = torch.nonzero(top_idx == e, as_tuple=True)
            y = self.experts.expert(e, flat[rows]) * weights[rows, slot].unsqueeze(-1)
            out.index_add_(0, rows, y)
        return out

    def _forward_static(self, x: torch.Tensor) -> torch.Tensor:
        if self.route_by_task is None:
            raise RuntimeError("static MoE: set route_by_task (one expert index per batch row) before forward")
        route = self.route_by_task.to(x.device)
        if route.shape[0] != x.shape[0]:
            raise RuntimeError(f"static MoE: {route.shape[0]} routes for a batch of {x.shape[0]}")
        out = torch.empty_like(x)
        for e in torch.unique(route).tolist():
            rows = torch.nonzero(route == e, as_tuple=True)[0]
            out[rows] = self.experts.expert(e, x[rows])
        self.last_routing = route.detach()
        return out
