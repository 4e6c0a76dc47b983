"""Named model configurations.

- `tiny` (the embedded default): a few million parameters built from a seed in about a second on a
  CPU, with the shipped 571-token byte-level BPE; Franka joint profile. For tests, the demo and CI.
- `tiny-bimanual`: the same, sized for the ARX R5 bimanual profile (14-d, chunk 50, 3 cameras).
- `tiny-sim` / `tiny-sim-bimanual`: the starting points of `chatvla train` (math matching on the Franka,
  toy placement on the bimanual rig).
- `tiny-chatvla1`: the tiny model with ChatVLA v1's static MoE (understanding / control experts).
- `chatvla2-2b`: the paper's sizes, Qwen2-VL-2B + MoE (8 routed, top-2) + DiT-L expert, ARX R5
  bimanual profile. Config only: no weights exist on this machine; import or convert a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from chatvla.model.config import (
    MOE_AUTHORS_SCRIPTS,
    MOE_CHATVLA_V1,
    MOE_PAPER,
    ActionExpertConfig,
    ChatVLAConfig,
    MoEConfig,
    ReasoningConfig,
)
from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_JOINT, RobotProfile

TINY_SEED = 1234
TINY_VOCAB = 576  # 571 tokens (557 BPE + 14 Qwen2 specials), padded to a multiple of 64


def _tiny_token_ids() -> dict[str, int]:
    from chatvla.model.tokenizer import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    return {
        "image_token_id": tok.token_to_id(IMAGE_PAD),
        "video_token_id": tok.token_to_id(VIDEO_PAD),
        "vision_start_token_id": tok.token_to_id(VISION_START),
        "vision_end_token_id": tok.token_to_id(VISION_END),
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
    }


def tiny_vlm_dict() -> dict:
    ids = _tiny_token_ids()
    return {
        "text_config": {
            "vocab_size": TINY_VOCAB,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1000000.0},
            "rms_norm_eps": 1e-6,
            "bos_token_id": None,
            "eos_token_id": ids["eos_token_id"],
            "pad_token_id": ids["pad_token_id"],
        },
        "vision_config": {
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 128,
            "mlp_ratio": 2,
            "num_heads": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "image_token_id": ids["image_token_id"],
        "video_token_id": ids["video_token_id"],
        "vision_start_token_id": ids["vision_start_token_id"],
        "vision_end_token_id": ids["vision_end_token_id"],
        "tie_word_embeddings": False,
    }


def _tiny(profile: RobotProfile, moe: MoEConfig, model_id: str) -> ChatVLAConfig:
    return ChatVLAConfig(
        model_id=model_id,
        vlm=tiny_vlm_dict(),
        moe=moe,
        expert=ActionExpertConfig(
            depth=4,
            width=128,
            num_heads=4,
            chunk_size=profile.chunk_size,
            action_dim=profile.action_dim,
            state_dim=profile.state_dim,
        ),
        reasoning=ReasoningConfig(max_new_tokens=12, min_pixels=56 * 56, max_pixels=112 * 112),
        profile=profile,
        init_seed=TINY_SEED,
        init_std=0.08,  # N(0, 0.02) gives near-flat logits in a model this small
    )


def tiny() -> ChatVLAConfig:
    return _tiny(FRANKA_JOINT, replace(MOE_AUTHORS_SCRIPTS, expert_intermediate_size=128), "chatvla-tiny")


def tiny_bimanual() -> ChatVLAConfig:
    return _tiny(ARX_R5_BIMANUAL, replace(MOE_AUTHORS_SCRIPTS, expert_intermediate_size=128), "chatvla-tiny-bimanual")


def tiny_chatvla1() -> ChatVLAConfig:
    return _tiny(FRANKA_JOINT, MOE_CHATVLA_V1, "chatvla1-tiny")


SIM_ROPE_THETA = 10.0


def tiny_sim() -> ChatVLAConfig:
    """The starting point of the trained default (`chatvla train`): the tiny model sized for the sim's
    math-matching task. Cameras are read at their full 224x224 (64 tokens each) so the whiteboard and
    the card labels are legible; a deeper, wider vision tower reads them; joint targets predicted as
    offsets from the current joint state (the gripper stays absolute); room for the reasoning
    "24+12=36. Pick card 36 at (5, -12), place at (-3, 10). Next action:" (about 40 tokens)."""
    base = _tiny(FRANKA_JOINT, replace(MOE_AUTHORS_SCRIPTS, expert_intermediate_size=128), "chatvla-tiny-sim")
    vlm = tiny_vlm_dict()
    vlm["vision_config"].update(depth=3, embed_dim=96, num_heads=4)
    # M-RoPE gives each image token its row and column through the rotary frequencies of two sections
    # (Qwen2-VL: [temporal | height | width], highest frequencies first). With Qwen2-VL's theta 1e6 and
    # this model's 32-wide heads, the width section turns at 1e-4 to 1e-5 rad per column: 8 columns
    # rotate by 0.001 rad, so the decoder cannot tell where on the table a card lies. Theta 10 puts
    # the height section at 0.27-0.56 and the width section at 0.12-0.24 rad per token.
    vlm["text_config"]["rope_parameters"]["rope_theta"] = SIM_ROPE_THETA
    gripper = set(FRANKA_JOINT.gripper_indices)
    return replace(
        base,
        vlm=vlm,
        expert=replace(base.expert, relative_to_state=tuple(i for i in range(FRANKA_JOINT.action_dim)
                                                            if i not in gripper)),
        reasoning=ReasoningConfig(max_new_tokens=48, min_pixels=56 * 56, max_pixels=224 * 224),
    )


def tiny_sim_bimanual() -> ChatVLAConfig:
    """`tiny-sim` for the ARX R5 bimanual rig (toy placement on `sim-bimanual`): the same vision tower,
    rope theta, reasoning budget and pixel budget, with both arms' joint targets predicted as offsets
    from the state (the two grippers stay absolute). The processor has one pixel budget for every
    camera, so all three cameras are read at 224x224 (192 image tokens instead of tiny-sim's 128): the
    toys are coloured shapes a few centimetres wide, legible from the top camera at that size."""
    sim = tiny_sim()
    p = ARX_R5_BIMANUAL
    base = _tiny(p, replace(MOE_AUTHORS_SCRIPTS, expert_intermediate_size=128), "chatvla-tiny-sim-bimanual")
    gripper = set(p.gripper_indices)
    return replace(
        base,
        vlm=sim.vlm,
        expert=replace(base.expert, relative_to_state=tuple(i for i in range(p.action_dim) if i not in gripper)),
        reasoning=sim.reasoning,
    )


def chatvla2_2b() -> ChatVLAConfig:
    """Qwen2-VL-2B sizes (hidden 1536, 28 layers, 12 heads / 2 KV heads, vision 32 x 1280) + DiT-L."""
    vlm = {
        "text_config": {
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
            "rms_norm_eps": 1e-6,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
        "vision_config": {
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 1536,
            "mlp_ratio": 4,
            "num_heads": 16,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": True,
    }
    p = ARX_R5_BIMANUAL
    return ChatVLAConfig(
        model_id="chatvla2-2b",
        vlm=vlm,
        moe=MOE_PAPER,
        expert=ActionExpertConfig(depth=24, width=1024, num_heads=16, chunk_size=p.chunk_size,
                                  action_dim=p.action_dim, state_dim=p.state_dim, reasoning_layer_id=12),
        reasoning=ReasoningConfig(max_new_tokens=256),
        profile=p,
    )


PRESETS: dict[str, Callable[[], ChatVLAConfig]] = {
    "tiny": tiny,
    "tiny-bimanual": tiny_bimanual,
    "tiny-chatvla1": tiny_chatvla1,
    "tiny-sim": tiny_sim,
    "tiny-sim-bimanual": tiny_sim_bimanual,
    "chatvla2-2b": chatvla2_2b,
}
# Trained checkpoints that ship inside the package, by name: `chatvla serve --model chatvla-tiny-mm`.
SHIPPED_DIR = Path(__file__).parent / "assets" / "checkpoints"
SHIPPED: dict[str, Path] = {"chatvla-tiny-mm": SHIPPED_DIR / "chatvla-tiny-mm"}
DEFAULT_MODEL = "chatvla-tiny-mm"  # what `chatvla serve` and `chatvla demo` load without --model

# Presets that are complete without a weights file (built from their seed).
SEEDED_PRESETS = ("tiny", "tiny-bimanual", "tiny-chatvla1", "tiny-sim", "tiny-sim-bimanual")


def get_preset(name: str) -> ChatVLAConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}") from None


def parameter_counts(cfg: ChatVLAConfig) -> dict[str, int]:
    """Parameter counts per part, computed on the meta device (no memory, no weights needed)."""
    import torch

    from chatvla.model.action_expert import ActionExpert
    from chatvla.model.vlm import build_vlm

    vlm = build_vlm(cfg.with_updates(init_seed=None), device="meta")
    with torch.device("meta"):
        expert = ActionExpert(cfg.expert, cfg.sampler, cfg.hidden_size)

    def count(m: torch.nn.Module, prefix: str = "") -> int:
        seen: set[int] = set()
        total = 0
        for n, p in m.named_parameters():
            if n.startswith(prefix) and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    tc = cfg.vlm["text_config"]
    top_k = cfg.moe.top_k if cfg.moe.kind == "dynamic" else 1
    routed_per_expert = 3 * tc["hidden_size"] * (cfg.moe.expert_intermediate_size or tc["intermediate_size"])
    n_moe = sum(cfg.moe.applies_to(i) for i in range(tc["num_hidden_layers"]))
    inactive = n_moe * (cfg.moe.num_experts - top_k) * routed_per_expert if cfg.moe.kind != "dense" else 0
    total = count(vlm) + count(expert)
    return {
        "vision": count(vlm, "model.visual."),
        "language_model": count(vlm, "model.language_model.") + count(vlm, "lm_head."),
        "action_expert": count(expert),
        "total": total,
        "active_per_token": total - inactive,
    }
