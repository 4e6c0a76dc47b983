"""The MoE block: top-k routing per token, always-on shared experts, ChatVLA v1's task switch."""

from __future__ import annotations

import torch

from chatvla.model.config import MOE_AUTHORS_SCRIPTS, MOE_CHATVLA_V1, MOE_PAPER, MoEConfig
from chatvla.model.moe import DenseMLP, MoEBlock


def _block(cfg: MoEConfig, seed: int = 0) -> MoEBlock:
    torch.manual_seed(seed)
    b = MoEBlock(16, 32, cfg)
    for p in b.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return b


def _reference(b: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop over the definition: softmax over the kept top-k logits + shared experts."""
    out = []
    for tok in x.reshape(-1, x.shape[-1]):
        logits = b.gate(tok)
        vals, idx = torch.topk(logits, b.top_k)
        w = torch.softmax(vals, -1)
        y = sum(w[j] * b.experts.expert(int(idx[j]), tok[None])[0] for j in range(b.top_k))
        if b.shared_expert is not None:
            y = y + b.shared_expert(tok[None])[0]
        out.append(y)
    return torch.stack(out).reshape(x.shape)


def test_router_picks_top_k_per_token_and_matches_definition():
    b = _block(MOE_PAPER)
    x = torch.randn(2, 5, 16)
    y = b(x)
    assert b.last_routing.shape == (10, 2)
    expected_idx = torch.topk(b.gate(x.reshape(-1, 16)), 2).indices
    assert torch.equal(b.last_routing, expected_idx)
    assert len(torch.unique(b.last_routing)) > 2, "different tokens should pick different experts"
    torch.testing.assert_close(y, _reference(b, x), rtol=1e-5, atol=1e-5)


def test_shared_experts_always_contribute():
    b = _block(MOE_AUTHORS_SCRIPTS)
    x = torch.randn(1, 7, 16)
    y = b(x)
    shared = b.shared_expert(x)
    assert shared.abs().min() > 0
    # Remove the shared expert: every token's output changes by exactly its shared contribution.
    saved, b.shared_expert = b.shared_expert, None
    routed_only = b(x)
    b.shared_expert = saved
    torch.testing.assert_close(y - routed_only, shared, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, _reference(b, x), rtol=1e-5, atol=1e-5)


def test_several_shared_experts_fuse_into_one_wide_mlp():
    cfg = MoEConfig(kind="dynamic", num_routed_experts=4, top_k=2, num_shared_experts=3, expert_intermediate_size=8)
    b = _block(cfg)
    assert b.shared_expert.gate_proj.weight.shape == (24, 16)
    x = torch.randn(4, 16)
    parts = []
    for j in range(3):
        m = DenseMLP(16, 8)
        m.gate_proj.weight.data = b.shared_expert.gate_proj.weight[j * 8:(j + 1) * 8]
        m.up_proj.weight.data = b.shared_expert.up_proj.weight[j * 8:(j + 1) * 8]
        m.down_proj.weight.data = b.shared_expert.down_proj.weight[:, j * 8:(j + 1) * 8]
        parts.append(m(x))
    torch.testing.assert_close(b.shared_expert(x), sum(parts), rtol=1e-5, atol=1e-5)


def test_chatvla1_static_moe_routes_each_request_by_task():
    b = _block(MOE_CHATVLA_V1)
    x = torch.randn(3, 4, 16)
    b.route_by_task = torch.tensor([0, 1, 1])
    y = b(x)
    torch.testing.assert_close(y[0], b.experts.expert(0, x[0]))
    torch.testing.assert_close(y[1], b.experts.expert(1, x[1]))
    assert not torch.allclose(y[0], b.experts.expert(1, x[0]))


def test_static_moe_without_a_route_is_an_error():
    b = _block(MOE_CHATVLA_V1)
    try:
        b(torch.randn(1, 2, 16))
    except RuntimeError as e:
        assert "route_by_task" in str(e)
    else:
        raise AssertionError("expected an error")


def test_small_calls_run_every_expert_and_large_ones_gather_with_the_same_outputs():
    """A decode step (one token per robot) takes the dense path, a prefill the gather path: both are the
    definition, and route the same."""
    from chatvla.model.moe import DENSE_ROUTING_MAX_TOKENS

    b = _block(MOE_AUTHORS_SCRIPTS)
    x = torch.randn(1, 3 * DENSE_ROUTING_MAX_TOKENS, 16)
    few = x[:, :3]
    torch.testing.assert_close(b(few), _reference(b, few), rtol=1e-5, atol=1e-5)
    few_routes = b.last_routing
    torch.testing.assert_close(b(x), _reference(b, x), rtol=1e-5, atol=1e-5)
    assert torch.equal(b.last_routing[:3], few_routes)
    dense = b._all_experts(x[0], torch.zeros(x.shape[1], 4).scatter(
        1, b.last_routing, torch.softmax(torch.topk(b.gate(x[0]), 2).values, -1)))
    torch.testing.assert_close(dense, b._chosen_experts(x[0], b.last_routing,
                                                        torch.softmax(torch.topk(b.gate(x[0]), 2).values, -1)),
                               rtol=1e-5, atol=1e-5)
