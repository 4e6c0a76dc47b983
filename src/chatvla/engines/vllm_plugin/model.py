"""The ChatVLA-2 backbone as a vLLM model: vLLM's Qwen2-VL with the decoder MLPs swapped for ours.

Only imported inside vLLM processes (through `register()` in this package). The semantics follow
`chatvla.model.moe` exactly:

- dynamic MoE (ChatVLA-2): router `mlp.gate` (Linear, bias if `router_bias`) -> top-k -> softmax over
  the kept logits, which is vLLM's FusedMoE with `renormalize=True`; plus the shared experts
  `mlp.shared_expert.*` summed in with NO gate (vLLM's Qwen2MoeSparseMoeBlock multiplies its shared
  expert by sigmoid(shared_expert_gate(x)), so it cannot be reused as is).
- static MoE (ChatVLA v1): the request's task picks one of two MLPs. In vLLM every request is a robot
  control request, so each layer is a dense MLP built from the control expert's weights. Routing
  understanding / VQA requests to the other expert is a torch-engine feature.
- dense: vLLM's stock Qwen2 MLP.

Checkpoint names are the ones `chatvla.model.checkpoint.save_checkpoint` writes (`model.layers.*`,
`visual.*`, `lm_head.*`); the fused expert tensors `mlp.experts.gate_up_proj [E, 2I, H]` (gate rows
first) and `mlp.experts.down_proj [E, H, I]` are split per expert and handed to FusedMoE's own weight
loader, so tensor / expert parallel sharding is vLLM's business.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.models.qwen2 import Qwen2MLP
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

CONTROL_TASK = "control"


def moe_settings(hf_config) -> dict:
    """The MoE keys of a chatvla-serve config.json, with defaults for a plain Qwen2-VL."""
    tc = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config.text_config
    kind = getattr(tc, "moe_kind", None) or ("dynamic" if getattr(tc, "num_experts", 0) else "dense")
    chatvla = getattr(hf_config, "chatvla", None) or {}
    tasks = tuple((chatvla.get("moe") or {}).get("static_tasks") or ("understanding", CONTROL_TASK))
    return {
        "kind": kind,
        "num_experts": int(getattr(tc, "num_experts", 0) or 0),
        "top_k": int(getattr(tc, "num_experts_per_tok", 1) or 1),
        "expert_intermediate": int(getattr(tc, "moe_intermediate_size", 0) or tc.intermediate_size),
        "shared_intermediate": int(getattr(tc, "shared_expert_intermediate_size", 0) or 0),
        "router_bias": bool(getattr(tc, "router_bias", False)),
        "dense_layers": frozenset(getattr(tc, "mlp_only_layers", None) or ()),
        "control_expert": tasks.index(CONTROL_TASK) if CONTROL_TASK in tasks else 1,
        "hidden_size": int(tc.hidden_size),
        "hidden_act": getattr(tc, "hidden_act", "silu"),
        "num_layers": int(tc.num_hidden_layers),
    }


class ChatVLAMoE(nn.Module):
    """Routed experts (FusedMoE, renormalised top-k softmax) + ungated shared experts: [T, H] -> [T, H]."""

    def __init__(self, s: dict, quant_config, prefix: str) -> None:
        super().__init__()
        self.hidden_size = s["hidden_size"]
        self.gate = GateLinear(s["hidden_size"], s["num_experts"], bias=s["router_bias"], prefix=f"{prefix}.gate")
        self.experts = FusedMoEFactory(
            num_experts=s["num_experts"],
            top_k=s["top_k"],
            hidden_size=s["hidden_size"],
            intermediate_size=s["expert_intermediate"],
            renormalize=True,  # softmax over all, keep top-k, renormalise == softmax over the kept logits
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
        )
        self.shared_expert = (
            Qwen2MLP(s["hidden_size"], s["shared_intermediate"], s["hidden_act"], quant_config=quant_config,
                     prefix=f"{prefix}.shared_expert")
            if s["shared_intermediate"] > 0 else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.view(-1, self.hidden_size)
        router_logits, _ = self.gate(x)
        out = self.experts(hidden_states=x, router_logits=router_logits)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)  # summed in, no gate (chatvla.model.moe.MoEBlock)
        return out.view(shape)


class ChatVLA2ForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2-VL whose decoder MLPs are ChatVLA-2's MoE blocks (or the control expert of a static MoE)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        s = self._chatvla_moe = moe_settings(vllm_config.model_config.hf_config)
        quant_config = vllm_config.quant_config
        lm = self.language_model.model
        # The stock dense MLPs are replaced layer by layer: the peak memory is the final model plus one
        # dense MLP, not the two models side by side.
        for i in range(lm.start_layer, lm.end_layer):
            if s["kind"] == "dense" or i in s["dense_layers"]:
                continue
            layer = lm.layers[i]
            mlp_prefix = f"{prefix + '.' if prefix else ''}language_model.model.layers.{i}.mlp"
            if s["kind"] == "static":
                layer.mlp = Qwen2MLP(s["hidden_size"], s["expert_intermediate"], s["hidden_act"],
                                     quant_config=quant_config, prefix=mlp_prefix)
            elif s["kind"] == "dynamic":
                layer.mlp = ChatVLAMoE(s, quant_config, mlp_prefix)
            else:
                raise ValueError(f"unknown moe_kind {s['kind']!r} in config.json text_config")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        s = self._chatvla_moe
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def rest() -> Iterator[tuple[str, torch.Tensor]]:
            for name, w in weights:
                if ".mlp.experts." not in name:
                    yield name, w
                elif s["kind"] == "static":
                    yield from _static_expert_as_dense(name, w, s["control_expert"])
                else:
                    loaded.update(self._load_routed_experts(name, w, params))

        loaded.update(super().load_weights(rest()))
        return loaded

    def _load_routed_experts(self, name: str, w: torch.Tensor, params: dict) -> set[str]:
        """`model.layers.{i}.mlp.experts.{gate_up_proj|down_proj}` [E, ...] -> FusedMoE w13 / w2, per expert."""
        if not name.startswith("model.layers."):
            raise KeyError(f"unexpected expert tensor {name}")
        layer = int(name.split(".")[2])
        lm = self.language_model.model
        if not lm.start_layer <= layer < lm.end_layer:
            return set()  # another pipeline stage owns it
        base = f"language_model.model.layers.{layer}.mlp.experts.routed_experts"
        if name.endswith("experts.gate_up_proj"):
            target = f"{base}.w13_weight"
            inter = w.shape[1] // 2
            shards = (("w1", lambda e: w[e, :inter]), ("w3", lambda e: w[e, inter:]))
        elif name.endswith("experts.down_proj"):
            target = f"{base}.w2_weight"
            shards = (("w2", lambda e: w[e]),)
        else:
            raise KeyError(f"unexpected expert tensor {name}")
        param = params[target]
        for e in range(w.shape[0]):
            for shard_id, get in shards:
                param.weight_loader(param, get(e), weight_name=target, shard_id=shard_id, expert_id=e)
        return {target}


def _static_expert_as_dense(name: str, w: torch.Tensor, expert: int) -> Iterator[tuple[str, torch.Tensor]]:
    """A static MoE's stacked experts -> the control expert as a stock dense MLP (gate/up/down_proj)."""
    stem = name.rsplit(".experts.", 1)[0]
    if name.endswith("experts.gate_up_proj"):
        inter = w.shape[1] // 2
        yield f"{stem}.gate_proj.weight", w[expert, :inter]
        yield f"{stem}.up_proj.weight", w[expert, inter:]
    elif name.endswith("experts.down_proj"):
        yield f"{stem}.down_proj.weight", w[expert]
    else:
        raise KeyError(f"unexpected expert tensor {name}")
