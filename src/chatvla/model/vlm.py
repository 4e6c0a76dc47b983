"""The VLM: transformers' Qwen2-VL with each decoder MLP replaced by the MoE block.

Checkpoint tensor names use the layout transformers writes to disk and vLLM loads
(`model.layers.*`, `visual.*`, `lm_head.*`), not the in-memory module paths of transformers 5
(`model.language_model.*`, `model.visual.*`); `checkpoint_name` / `module_name` translate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from chatvla.model.config import ChatVLAConfig
from chatvla.model.moe import MoEBlock

log = logging.getLogger(__name__)

_MODULE_TO_CKPT = (("model.language_model.", "model."), ("model.visual.", "visual."))


def checkpoint_name(module_key: str) -> str:
    """In-memory parameter name -> on-disk name."""
    for mem, disk in _MODULE_TO_CKPT:
        if module_key.startswith(mem):
            return disk + module_key[len(mem):]
    return module_key


def module_name(ckpt_key: str) -> str:
    """On-disk name -> in-memory parameter name (inverse of `checkpoint_name`)."""
    if ckpt_key.startswith("visual."):
        return "model.visual." + ckpt_key[len("visual."):]
    if ckpt_key.startswith("model."):
        return "model.language_model." + ckpt_key[len("model."):]
    return ckpt_key


def hf_config(cfg: ChatVLAConfig) -> Qwen2VLConfig:
    return Qwen2VLConfig(**{k: v for k, v in cfg.vlm.items() if k not in ("transformers_version",)})


def build_vlm(cfg: ChatVLAConfig, *, device: str | torch.device = "cpu") -> Qwen2VLForConditionalGeneration:
    """Build the Qwen2-VL + MoE skeleton (weights uninitialised unless `cfg.init_seed` is set)."""
    hcfg = hf_config(cfg)
    hcfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(hcfg)
        tc = hcfg.text_config
        for i, layer in enumerate(model.model.language_model.layers):
            if cfg.moe.applies_to(i):
                layer.mlp = MoEBlock(tc.hidden_size, tc.intermediate_size, cfg.moe)
    if hcfg.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.eval()
    if cfg.init_seed is not None and torch.device(device).type != "meta":
        init_weights(model, seed=cfg.init_seed, std=cfg.init_std)
    return model


def init_weights(module: nn.Module, *, seed: int, std: float) -> None:
    """Re-draw every parameter from one seeded generator, in sorted-name order.

    transformers' own init depends on its version; this does not, so a preset built from a seed is
    the same model on every machine. Norm weights start at 1, biases at 0, everything else N(0, std).
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if id(p) in seen:
                continue
            seen.add(id(p))
            leaf = name.rsplit(".", 1)[-1]
            is_norm = any(s in name for s in ("norm", "ln_q", "layernorm"))
            if leaf == "bias":
                p.zero_()
            elif is_norm and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


def vlm_state_dict(model: Qwen2VLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Tensors to save, under on-disk names; a tied lm_head is saved once (as the embedding)."""
    out: dict[str, torch.Tensor] = {}
    tied = model.config.tie_word_embeddings
    for k, v in model.state_dict().items():
        if tied and k == "lm_head.weight":
            continue
        out[checkpoint_name(k)] = v.detach().contiguous()
    return out


def dense_to_moe_state_dict(
    dense: Mapping[str, torch.Tensor], cfg: ChatVLAConfig, *, router_seed: int = 0, router_std: float = 0.02
) -> dict[str, torch.Tensor]:
    """Convert a dense Qwen2-VL checkpoint (on-disk names) to this MoE layout.

    Every routed (and shared) expert starts as a copy of the layer's dense MLP; routers start small
    and random (seeded) so that routing is not a tie, with a zero bias when `router_bias` is set.
    With shared experts, the converted layer's MLP output is (1 + num_shared) x the dense one until
    training adapts it; with routed experts only, the converted model computes exactly what the
    dense one did.
    """
    tc = cfg.vlm["text_config"]
    hidden = tc["hidden_size"]
    gen = torch.Generator().manual_seed(router_seed)
    out = dict(dense)
    for i in range(tc["num_hidden_layers"]):
        if not cfg.moe.applies_to(i):
            continue
        pre = f"model.layers.{i}.mlp."
        try:
            g, u, d = (out.pop(pre + n + ".weight") for n in ("gate_proj", "up_proj", "down_proj"))
        except KeyError as e:
            raise KeyError(f"dense checkpoint lacks {e.args[0]} needed to build layer {i}'s experts") from None
        inter = g.shape[0]
        want = cfg.moe.expert_intermediate_size or tc["intermediate_size"]
        if inter != want:
            raise ValueError(f"layer {i}: dense MLP is {inter} wide, the MoE experts are {want}")
        e = cfg.moe.num_experts
        out[pre + "experts.gate_up_proj"] = torch.cat([g, u], 0).unsqueeze(0).repeat(e, 1, 1).contiguous()
        out[pre + "experts.down_proj"] = d.unsqueeze(0).repeat(e, 1, 1).contiguous()
        if cfg.moe.kind == "dynamic":
            out[pre + "gate.weight"] = torch.randn(e, hidden, generator=gen) * router_std
            if cfg.moe.router_bias:  # zero: routing starts from the weights alone
                out[pre + "gate.bias"] = torch.zeros(e, dtype=out[pre + "gate.weight"].dtype)
            n_sh = cfg.moe.num_shared_experts
            if n_sh:
                out[pre + "shared_expert.gate_proj.weight"] = g.repeat(n_sh, 1).contiguous()
                out[pre + "shared_expert.up_proj.weight"] = u.repeat(n_sh, 1).contiguous()
                out[pre + "shared_expert.down_proj.weight"] = d.repeat(1, n_sh).contiguous()
    return out


def moe_blocks(model: Qwen2VLForConditionalGeneration) -> list[MoEBlock]:
    return [m for m in model.modules() if isinstance(m, MoEBlock)]
