"""One-off, offline importer for the authors' ChatVLA-2 checkpoints (DexVLA-style layout).

Their layout: an HF directory (`checkpoint-N/`) with a flat `config.json` (`model_type: qwen2_vla`,
text fields at the top level, `vision_config`, `rope_scaling` with `mrope_section`), safetensors that
hold the VLM (`model.layers.*`, `visual.*`, `lm_head.*`, per-expert MoE modules), the projectors
(`input_action_proj.*`, `reasoning_action_proj.*`) and the DiT head (`policy_head.*`), plus
`dataset_stats.pkl` one level up. The pickle is read only when the caller passes `trust_pickle=True`
(`--trust-pickle` on the command line): unpickling runs arbitrary code, so this never happens in the
server, only here, by explicit request, on a file the user vouches for.

The output is our checkpoint format (safetensors + JSON), which the server loads without pickle.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from chatvla.model.config import ActionExpertConfig, ChatVLAConfig, MoEConfig, NormStats, ReasoningConfig
from chatvla.profiles import RobotProfile

log = logging.getLogger(__name__)

# Tensors of the authors' checkpoints that ChatVLA-2's inference path never uses.
UNUSED_PREFIXES = ("policy_head.hidden_states_for_cosattn.", "reasoning_film.", "action_proj.", "reasoning_proj.")
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "bos_token_id", "eos_token_id", "use_sliding_window", "sliding_window", "max_window_layers")


class ImportError_(ValueError):
    """The source directory is not an importable authors' checkpoint (message says why)."""


def read_authors_stats(path: Path, *, trust_pickle: bool) -> NormStats:
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


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_SHARED = re.compile(r"^model\.layers\.(\d+)\.mlp\.shared_experts?(?:\.(\d+))?\.(gate|up|down)_proj\.weight$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.(?:router\.topkroute_linear|gate)\.(weight|bias)$")


def _convert_vlm(t: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Authors' per-module MoE tensors -> our fused layout; returns tensors and what was found."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    shared: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    router_bias = False
    for k, v in t.items():
        if m := _EXPERT.match(k):
            experts.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = v
        elif m := _SHARED.match(k):
            shared.setdefault(int(m[1]), {}).setdefault(int(m[2] or 0), {})[m[3]] = v
        elif m := _ROUTER.match(k):
            out[f"model.layers.{m[1]}.mlp.gate.{m[2]}"] = v
            router_bias |= m[2] == "bias"
        elif k.startswith(("model.", "visual.", "lm_head.")):
            out[k] = v
    for layer, by_e in experts.items():
        es = [by_e[e] for e in sorted(by_e)]
        pre = f"model.layers.{layer}.mlp."
        out[pre + "experts.gate_up_proj"] = torch.stack([torch.cat([e["gate"], e["up"]], 0) for e in es]).contiguous()
        out[pre + "experts.down_proj"] = torch.stack([e["down"] for e in es]).contiguous()
    shared_counts = set()
    for layer, by_j in shared.items():
        js = [by_j[j] for j in sorted(by_j)]
        pre = f"model.layers.{layer}.mlp.shared_expert."
        out[pre + "gate_proj.weight"] = torch.cat([j["gate"] for j in js], 0).contiguous()
        out[pre + "up_proj.weight"] = torch.cat([j["up"] for j in js], 0).contiguous()
        out[pre + "down_proj.weight"] = torch.cat([j["down"] for j in js], 1).contiguous()
        shared_counts.add(len(js) if len(js) > 1 else None)
    info = {
        "moe_layers": sorted(experts),
        "num_experts": len(next(iter(experts.values()))) if experts else 0,
        "shared_layers": sorted(shared),
        "router_bias": router_bias,
        "expert_intermediate": first["gate"].shape[0] if (first := _first_expert(experts)) else None,
    }
    return out, info


def _first_expert(experts: dict[int, dict[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor] | None:
    for by_e in experts.values():
        for e in by_e.values():
            return e
    return None


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
    stats = read_authors_stats(Path(stats_path) if stats_path else src.parent / "dataset_stats.pkl",
                               trust_pickle=trust_pickle)
    tensors = _read_all(src)
    dropped = sorted(k for k in tensors if k.startswith(UNUSED_PREFIXES))
    vlm_t, info = _convert_vlm(tensors)
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
    if info["num_experts"]:
        static = not any(k.endswith("mlp.gate.weight") for k in vlm_t)
        moe = MoEConfig(
            kind="static" if static else "dynamic",
            num_routed_experts=info["num_experts"],
            top_k=1 if static else int(raw.get("routed_top_k") or max(1, info["num_experts"] // 2)),
            num_shared_experts=int(raw.get("shared_expert_num", 1 if info["shared_layers"] else 0)),
            expert_intermediate_size=info["expert_intermediate"],
            router_bias=info["router_bias"],
            layers=None if len(info["moe_layers"]) == raw.get("num_hidden_layers") else tuple(info["moe_layers"]),
        )
    else:
        moe = MoEConfig(kind="dense", num_routed_experts=1, top_k=1, num_shared_experts=0)
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
