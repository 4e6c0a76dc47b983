"""The ChatVLA-2 model in PyTorch: MoE Qwen2-VL backbone, reasoning-following action expert, checkpoints.

Server-side only (imports torch). Entry point: `load_model("tiny")` or `load_model("/path/to/ckpt")`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatvla.model.chatvla2 import ChatVLA2, ReasoningOutput
from chatvla.model.config import ChatVLAConfig, NormStats

__all__ = ["ChatVLA2", "ChatVLAConfig", "NormStats", "ReasoningOutput", "build_model", "load_model"]


def build_model(cfg: ChatVLAConfig, *, device: str | torch.device = "cpu") -> ChatVLA2:
    """A model from a config; weights are drawn from `cfg.init_seed` (tiny presets)."""
    from chatvla.model.tokenizer import load_tiny_tokenizer

    if cfg.init_seed is None:
        raise ValueError(f"{cfg.model_id}: no init_seed and no weights; load a checkpoint directory instead")
    return ChatVLA2(cfg, load_tiny_tokenizer(), device=device)


def load_model(
    name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ChatVLA2:
    """A shipped checkpoint (`chatvla-tiny-mm`, the trained default), a seeded preset (`tiny`,
    `tiny-bimanual`, `tiny-chatvla1`, `tiny-sim`: untrained, for tests) or a checkpoint directory."""
    from chatvla.model.checkpoint import load_checkpoint
    from chatvla.model.presets import PRESETS, SEEDED_PRESETS, SHIPPED, get_preset

    if name_or_path in SHIPPED:
        return load_checkpoint(SHIPPED[name_or_path], device=device, dtype=dtype)

    if name_or_path in PRESETS:
        if name_or_path not in SEEDED_PRESETS:
            raise ValueError(
                f"preset {name_or_path!r} is a configuration only (no weights ship with chatvla-serve); "
                "pass a checkpoint directory made by `chatvla model import` or `chatvla model save`"
            )
        return build_model(get_preset(name_or_path), device=device).to(dtype=dtype)
    if not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a shipped model ({', '.join(SHIPPED)}), a preset ({', '.join(PRESETS)}) "
            "nor an existing checkpoint directory"
        )
    return load_checkpoint(name_or_path, device=device, dtype=dtype)
