"""One-off, offline importer for the authors' ChatVLA-2 checkpoints (DexVLA-style layout).

Their layout: an HF directory (`checkpoint-N/`) with a flat `config.json` (`model_type: qwen2_vla`,
text fields at the top level, `vision_config`, `rope_scaling` with `mrope_section`, and their training
flags: `using_moe`, `using_shared_routed_expert`, `using_static_expert`, `routed_expert_num`,
`shared_expert_num`, `routed_top_k`, `using_film`, ...), safetensors that hold the VLM (`model.layers.*`,
`visual.*`, `lm_head.*`, one module per expert), the projectors (`input_action_proj.*`,
`reasoning_action_proj.*`) and the DiT head (`policy_head.*`), plus `dataset_stats.pkl` one level up.
The pickle is read only when the caller passes `trust_pickle=True` (`--trust-pickle` on the command
line): unpickling runs arbitrary code, so this never happens in the server, only here, by explicit
request, on a file the user vouches for.

Their MoE per decoder layer (`model.layers.N.`):
    share_moe_expert.routed_experts.router.topkroute_linear.{weight,bias}   router (Linear with bias)
    share_moe_expert.routed_experts.experts.E.{gate,up,down}_proj.weight    routed experts
    share_moe_expert.shared_experts.J.{gate,up,down}_proj.weight            always-on, summed
    static_expert.experts.{0,1}.{gate,up,down}_proj.weight                  ChatVLA v1 (0: VQA, 1: control)
These are fused into our layout (`chatvla.model.moe`). Checkpoints that need computation this model
does not do (FiLM, GR00T-like attention, DeepSeek / DeepSpeed MoE, static + routed averaged) are
refused with an error naming the flag or tensor, never imported with the extra parts dropped.

The output is our checkpoint format (safetensors + JSON), which the server loads without pickle.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from chatvla.model.config import ActionExpertConfig, ChatVLAConfig, MoEConfig, NormStats, ReasoningConfig
from chatvla.profiles import RobotProfile

log = logging.getLogger(__name__)

# Tensors of the authors' checkpoints that ChatVLA-2's inference path never uses.
UNUSED_PREFIXES = ("policy_head.hidden_states_for_cosattn.", "action_proj.", "reasoning_proj.", "expert_traffic")
# Top-level modules that become part of our model (everything else is either unused or refused).
_KEPT_PREFIXES = ("model.", "visual.", "lm_head.", "policy_head.", "input_action_proj.", "reasoning_action_proj.")
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "bos_token_id", "eos_token_id", "use_sliding_window", "sliding_window", "max_window_layers")

# Training flags (their `model_args`, copied into config.json) for features this model does not compute.
# Importing such a checkpoint without them would silently serve a different function, so it is refused.
_REFUSED_FLAGS = {
    "using_film": "FiLM modulation of the action condition by the reasoning (`reasoning_film.*`)",
    "using_groot_like_attn": "GR00T-like attention from the action head into the VLM's layers",
}
# MoE flags, meaningful only with `using_moe`; each names a routing this model does not implement.
_REFUSED_MOE_FLAGS = {
    "using_deepseek_moe": "DeepSeek-style sigmoid routing (`deepseek_expert.*`: sigmoid gate scores, the gate "
                          "bias only steers the selection, weights renormalised)",
    "using_deepspeed_moe": "DeepSpeed MoE (`deepspeed_expert.*`: capacity-limited top-k gating)",
}
_REFUSED_MODULES = {"deepseek_expert": "using_deepseek_moe", "deepspeed_expert": "using_deepspeed_moe"}
_STATIC_PLUS_ROUTED = ("static + routed averaged (`using_static_expert` with `using_shared_routed_expert`: the "
                       "authors average the static expert's and the routed MoE's outputs)")


class ImportError_(ValueError):
    """The source directory is not an importable authors' checkpoint (message says why)."""


def read_authors_stats(path: Path, *, trust_pickle: bool) -> NormStats:
    """Read `dataset_stats.pkl`; only on explicit request, because unpickling can run arbitrary code."""
    if not path.is_file():
        raise ImportError_(f"missing {path} (the authors keep dataset_stats.pkl next to the checkpoint folder)")
    if not trust_pickle:
        raise ImportError_(
            f"{path} is a pickle; unpickling can run arbitrary code. Re-run with --trust-pickle if you trust "
            "this file (it is read once here and written out as JSON)."
        )
    import pickle

    with path.open("rb") as f:
        raw = pickle.load(f)
    try:
        return NormStats(
            action_min=tuple(float(x) for x in raw["action_min"]),
            action_max=tuple(float(x) for x in raw["action_max"]),
            state_mean=tuple(float(x) for x in raw["qpos_mean"]),
            state_std=tuple(float(x) for x in raw["qpos_std"]),
        )
    except KeyError as e:
        raise ImportError_(f"{path} lacks {e.args[0]!r} (need action_min/max, qpos_mean/std)") from None


def _vlm_config(src: dict[str, Any]) -> dict[str, Any]:
    text = {k: src[k] for k in _TEXT_KEYS if k in src}
    rope = dict(src.get("rope_scaling") or {})
    text["rope_parameters"] = {
        "rope_type": "default",
        "mrope_section": list(rope.get("mrope_section", [16, 24, 24])),
        "rope_theta": float(text.pop("rope_theta", 1000000.0)),
    }
    vision = {k: v for k, v in dict(src.get("vision_config") or {}).items()
              if k not in ("model_type", "architectures")}
    out = {"text_config": text, "vision_config": vision,
           "tie_word_embeddings": bool(src.get("tie_word_embeddings", False))}
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if k in src:
            out[k] = src[k]
    return out


def _read_all(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ImportError_(f"no *.safetensors in {src}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118
                out[k] = h.get_tensor(k)
    return out


def check_supported(raw: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse checkpoints whose config flags or tensors ask for computation this model does not do.

    Without this, such a checkpoint would load (the extra modules simply dropped) and serve a
    different function than the one it was trained as; refusing names the flag or tensor prefix.
    """
    for flag, what in _REFUSED_FLAGS.items():
        if raw.get(flag):
            raise ImportError_(f"config.json sets {flag}: {what} is not implemented by chatvla-serve; "
                               "this checkpoint cannot be imported")
    if raw.get("using_moe"):
        for flag, what in _REFUSED_MOE_FLAGS.items():
            if raw.get(flag):
                raise ImportError_(f"config.json sets {flag}: MoE variant {what} is not implemented")
        if raw.get("using_static_expert") and raw.get("using_shared_routed_expert"):
            raise ImportError_(f"config.json: MoE variant {_STATIC_PLUS_ROUTED} is not implemented")
    if tensors is None:
        return
    if film := sorted(k for k in tensors if k.startswith("reasoning_film.")):
        raise ImportError_(f"the checkpoint holds reasoning_film.* ({len(film)} tensors): FiLM conditioning of "
                           "the action head is not implemented by chatvla-serve (using_film)")
    unknown = sorted({".".join(k.split(".")[:2]) for k in tensors
                      if not k.startswith(_KEPT_PREFIXES) and not k.startswith(UNUSED_PREFIXES)})
    if unknown:
        raise ImportError_(f"unrecognised tensors {unknown}: not part of the ChatVLA-2 layout this importer "
                           "knows, refusing rather than dropping them")


# Where the authors' decoder layers keep their MLP (`Qwen2VLDecoderLayer` of their qwen2_vla code):
#   mlp.{gate,up,down}_proj                                   dense (using_moe false)
#   share_moe_expert.routed_experts.router.topkroute_linear   router, nn.Linear with bias (NoisyTopkRouter)
#   share_moe_expert.routed_experts.experts.E.*               routed Qwen2 MLPs
#   share_moe_expert.shared_experts.J.*                       always-on Qwen2 MLPs, summed
#   static_expert.experts.{0,1}.*                             ChatVLA v1: 0 answers VQA, 1 controls the robot
_ROUTED = re.compile(r"^share_moe_expert\.routed_experts\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_SHARED = re.compile(r"^share_moe_expert\.shared_experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_ROUTER = re.compile(r"^share_moe_expert\.routed_experts\.router\.topkroute_linear\.(weight|bias)$")
_STATIC = re.compile(r"^static_expert\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(share_moe_expert|static_expert|deepseek_expert|deepspeed_expert)\.(.*)$")
_PROJS = ("gate", "up", "down")


@dataclass
class _LayerMoE:
    """One decoder layer's MoE tensors in the authors' layout, grouped by role."""

    routed: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    shared: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    router: dict[str, torch.Tensor] = field(default_factory=dict)
    static: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def kind(self, layer: int) -> str:
        if self.static and (self.routed or self.shared or self.router):
            raise ImportError_(f"model.layers.{layer}: MoE variant {_STATIC_PLUS_ROUTED} is not implemented")
        if self.static:
            return "static"
        if not self.routed and self.shared:
            raise ImportError_(f"model.layers.{layer}.share_moe_expert has shared experts but no routed experts "
                               "(routed_expert_num 0): MoE variant 'shared experts only' is not implemented")
        if not self.routed:
            raise ImportError_(f"model.layers.{layer}.share_moe_expert has a router but no routed experts")
        if "weight" not in self.router:
            raise ImportError_(f"missing tensor model.layers.{layer}.share_moe_expert.routed_experts.router."
                               "topkroute_linear.weight (the router)")
        return "dynamic"


def _experts(by_index: dict[int, dict[str, torch.Tensor]], where: str) -> list[dict[str, torch.Tensor]]:
    """Experts 0..N-1 in order, each with gate/up/down, all of one intermediate size."""
    if sorted(by_index) != list(range(len(by_index))):
        raise ImportError_(f"{where}: expert indices {sorted(by_index)} are not 0..{len(by_index) - 1}")
    out = []
    for i in range(len(by_index)):
        e = by_index[i]
        if missing := [p for p in _PROJS if p not in e]:
            raise ImportError_(f"missing tensor {where}.{i}.{missing[0]}_proj.weight")
        out.append(e)
    if len({(e["gate"].shape, e["up"].shape, e["down"].shape) for e in out}) != 1:
        raise ImportError_(f"{where}: experts of different shapes")
    return out


def _convert_vlm(t: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, _LayerMoE]]:
    """Authors' per-expert MoE tensors -> our fused layout (see chatvla.model.moe); returns the VLM
    tensors under our on-disk names and, per MoE layer, what was found (for the config)."""
    out: dict[str, torch.Tensor] = {}
    layers: dict[int, _LayerMoE] = {}
    for k, v in t.items():
        if not k.startswith(("model.", "visual.", "lm_head.")):
            continue
        m = _LAYER.match(k)
        if m is None:
            out[k] = v
            continue
        layer, module, rest = int(m[1]), m[2], m[3]
        if module in _REFUSED_MODULES:
            flag = _REFUSED_MODULES[module]
            raise ImportError_(f"tensor {k}: MoE variant {_REFUSED_MOE_FLAGS[flag]} ({flag}) is not implemented")
        lm = layers.setdefault(layer, _LayerMoE())
        rest = f"{module}.{rest}"
        if r := _ROUTED.match(rest):
            lm.routed.setdefault(int(r[1]), {})[r[2]] = v
        elif r := _SHARED.match(rest):
            lm.shared.setdefault(int(r[1]), {})[r[2]] = v
        elif r := _ROUTER.match(rest):
            lm.router[r[1]] = v
        elif r := _STATIC.match(rest):
            lm.static.setdefault(int(r[1]), {})[r[2]] = v
        elif ".router.noise_linear." in rest:
            raise ImportError_(f"tensor {k}: a noisy top-k router (noise added to the routing logits at "
                               "inference) is not implemented")
        else:
            raise ImportError_(f"unrecognised MoE tensor {k} (expected the ChatVLA-2 share_moe_expert / "
                               "static_expert layout)")
    for layer, lm in layers.items():
        pre = f"model.layers.{layer}.mlp."
        if lm.kind(layer) == "static":
            experts = _experts(lm.static, f"model.layers.{layer}.static_expert.experts")
        else:
            experts = _experts(lm.routed, f"model.layers.{layer}.share_moe_expert.routed_experts.experts")
            out[pre + "gate.weight"] = lm.router["weight"]
            if "bias" in lm.router:
                out[pre + "gate.bias"] = lm.router["bias"]
            if lm.shared:
                shared = _experts(lm.shared, f"model.layers.{layer}.share_moe_expert.shared_experts")
                if shared[0]["gate"].shape != experts[0]["gate"].shape:
                    raise ImportError_(f"model.layers.{layer}: shared experts are {shared[0]['gate'].shape[0]} "
                                       f"wide, routed experts {experts[0]['gate'].shape[0]}; this model needs "
                                       "one expert width")
                # Summed shared MLPs == one MLP over their concatenated intermediate layers.
                out[pre + "shared_expert.gate_proj.weight"] = torch.cat([j["gate"] for j in shared], 0).contiguous()
                out[pre + "shared_expert.up_proj.weight"] = torch.cat([j["up"] for j in shared], 0).contiguous()
                out[pre + "shared_expert.down_proj.weight"] = torch.cat([j["down"] for j in shared], 1).contiguous()
        out[pre + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([e["gate"], e["up"]], 0) for e in experts]).contiguous()
        out[pre + "experts.down_proj"] = torch.stack([e["down"] for e in experts]).contiguous()
    return out, layers


def _moe_config(raw: dict[str, Any], layers: dict[int, _LayerMoE]) -> MoEConfig:
    """Our MoEConfig from the tensors found, cross-checked with the authors' config keys
    (`routed_expert_num`, `shared_expert_num`, `routed_top_k`; their training defaults top-k to
    routed_expert_num // 2 when it is 0 or absent)."""
    if not layers:
        if raw.get("using_moe"):
            raise ImportError_("config.json sets using_moe but no tensor is under model.layers.N.share_moe_expert "
                               "or model.layers.N.static_expert")
        return MoEConfig(kind="dense", num_routed_experts=1, top_k=1, num_shared_experts=0)
    kinds = {lm.kind(i) for i, lm in layers.items()}
    if len(kinds) > 1:
        raise ImportError_(f"layers mix MoE kinds {sorted(kinds)}; this model has one MoE kind")
    kind = kinds.pop()
    num_layers = raw.get("num_hidden_layers")
    if raw.get("using_moe") and num_layers and (plain := sorted(set(range(num_layers)) - set(layers))):
        # Their decoder layers are all MoE when using_moe is set; a gap means missing tensors.
        raise ImportError_(f"config.json sets using_moe but decoder layers {plain} have no "
                           "share_moe_expert / static_expert tensors")
    moe_layers = None if len(layers) == num_layers else tuple(sorted(layers))
    first = layers[min(layers)]
    if kind == "static":
        if len(first.static) != 2:
            raise ImportError_(f"static MoE with {len(first.static)} experts; ChatVLA v1 has two "
                               "(0: understanding / VQA, 1: control)")
        return MoEConfig(kind="static", num_routed_experts=2, top_k=1, num_shared_experts=0,
                         expert_intermediate_size=first.static[0]["gate"].shape[0], layers=moe_layers)
    shapes = {(len(lm.routed), len(lm.shared), "bias" in lm.router) for lm in layers.values()}
    if len(shapes) > 1:
        raise ImportError_(f"MoE layers differ in (routed experts, shared experts, router bias): {sorted(shapes)}")
    n_routed, n_shared, bias = shapes.pop()
    for key, found in (("routed_expert_num", n_routed), ("shared_expert_num", n_shared)):
        if raw.get(key) is not None and int(raw[key]) != found:
            raise ImportError_(f"config.json {key} is {raw[key]}, but the tensors hold {found} per layer")
    top_k = int(raw.get("routed_top_k") or 0) or n_routed // 2
    if not 1 <= top_k <= n_routed:
        raise ImportError_(f"top-k {top_k} (config.json routed_top_k {raw.get('routed_top_k')!r}) is not in "
                           f"1..{n_routed}; set routed_top_k in config.json")
    return MoEConfig(kind="dynamic", num_routed_experts=n_routed, top_k=top_k, num_shared_experts=n_shared,
                     expert_intermediate_size=first.routed[0]["gate"].shape[0], router_bias=bias,
                     layers=moe_layers)


def import_authors_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    profile: RobotProfile,
    trust_pickle: bool = False,
    num_heads: int | None = None,
    stats_path: str | Path | None = None,
) -> Path:
    """Convert an authors' checkpoint directory into our format at `dst`. Offline; never in the server."""
    from chatvla.model.checkpoint import _load_strict, empty_model, save_checkpoint
    from chatvla.model.tokenizer import load_tokenizer
    from chatvla.model.vlm import module_name

    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ImportError_(f"missing {cfg_path}")
    raw = json.loads(cfg_path.read_text())
    if raw.get("model_type") != "qwen2_vla":
        raise ImportError_(f"{cfg_path}: model_type is {raw.get('model_type')!r}, expected 'qwen2_vla'")
    # Refusals come before the pickle: an unsupported checkpoint needs no --trust-pickle to find out.
    check_supported(raw)
    tensors = _read_all(src)
    check_supported(raw, tensors)
    vlm_t, moe_layers = _convert_vlm(tensors)
    moe = _moe_config(raw, moe_layers)
    stats = read_authors_stats(Path(stats_path) if stats_path else src.parent / "dataset_stats.pkl",
                               trust_pickle=trust_pickle)
    dropped = sorted(k for k in tensors if k.startswith(UNUSED_PREFIXES))
    head = {k[len("policy_head."):]: v for k, v in tensors.items()
            if k.startswith("policy_head.") and not k.startswith(UNUSED_PREFIXES)}
    if "x_embedder.weight" not in head:
        raise ImportError_(f"{src}: no policy_head.* DiT tensors (is this a ChatVLA-2 DiT checkpoint?)")
    width, action_dim = head["x_embedder.weight"].shape
    cond_dim = head["norm_after_pool.weight"].shape[0]
    depth = len({int(k.split(".")[1]) for k in head if k.startswith("blocks.")})
    phc = raw.get("policy_head_config") or {}
    expert = ActionExpertConfig(
        depth=depth,
        width=width,
        num_heads=int(num_heads or phc.get("num_heads", 16)),
        mlp_ratio=float(phc.get("mlp_ratio", 4.0)),
        chunk_size=head["pos_embed"].shape[1],
        action_dim=action_dim,
        state_dim=head["cond_obs_emb.weight"].shape[1] - cond_dim,
        reasoning_layer_id=phc.get("reasoning_layer_id"),
        timestep_freq_dtype="bfloat16",  # the authors' TimestepEmbedder rounds to bf16
    )
    cfg = ChatVLAConfig(
        model_id=raw.get("_name_or_path") or src.name,
        vlm=_vlm_config(raw),
        moe=moe,
        expert=expert,
        reasoning=ReasoningConfig(max_new_tokens=256),
        profile=profile,
    )
    try:
        tok = load_tokenizer(src)
    except (FileNotFoundError, ValueError) as e:
        raise ImportError_(str(e)) from None
    model = empty_model(cfg, tok, stats)
    vlm_sd = {module_name(k): v for k, v in vlm_t.items()}
    if cfg.vlm.get("tie_word_embeddings"):
        vlm_sd.setdefault("lm_head.weight", vlm_sd.get("model.language_model.embed_tokens.weight"))
    from chatvla.model.vlm import checkpoint_name

    _load_strict(model.vlm, vlm_sd, src, key_to_file=checkpoint_name)
    exp_sd = {("policy_head." + k): v for k, v in head.items()}
    for proj in ("input_action_proj", "reasoning_action_proj"):
        exp_sd.update({k: v for k, v in tensors.items() if k.startswith(proj + ".")})
    _load_strict(model.expert, exp_sd, src)
    out = save_checkpoint(model, dst)
    for extra in ("preprocessor_config.json", "chat_template.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, out / extra)
    if dropped:
        groups = sorted({".".join(d.split(".")[:2]) for d in dropped})
        log.info("dropped %d tensors unused at inference: %s", len(dropped), groups)
    return out
