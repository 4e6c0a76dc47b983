"""Properties of the preset configurations that training depends on."""

from __future__ import annotations

from chatvla.model.presets import get_preset
from chatvla.model.vlm import build_vlm


def test_the_sim_presets_rotary_positions_tell_image_columns_and_rows_apart() -> None:
    """The decoder only knows where an image token sits through M-RoPE's height and width sections. The
    trained default must say where a card lies, so across a camera's token grid each section has to
    turn by a usable angle (with Qwen2-VL's theta 1e6 and 32-wide heads the width section turned by
    0.001 rad across 8 columns)."""
    cfg = get_preset("tiny-sim")
    inv_freq = build_vlm(cfg.with_updates(init_seed=0)).model.language_model.rotary_emb.inv_freq
    t, h, w = cfg.vlm["text_config"]["rope_parameters"]["mrope_section"]
    assert t + h + w == inv_freq.numel()
    vision = cfg.vlm["vision_config"]
    grid = cfg.reasoning.max_pixels ** 0.5 / vision["patch_size"] / vision["spatial_merge_size"]  # 8 tokens
    span = grid - 1
    assert float(inv_freq[t:t + h].max()) * span > 1.0
    assert float(inv_freq[t + h:].max()) * span > 1.0
