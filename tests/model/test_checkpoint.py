"""Checkpoint directories: bit-exact round trips, clear errors, dense -> MoE conversion.

The authors' importer is tested in test_importer.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from chatvla.model import build_model, load_model
from chatvla.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from chatvla.model.config import ChatVLAConfig, MoEConfig
from chatvla.model.presets import PRESETS, parameter_counts, tiny
from chatvla.model.vlm import dense_to_moe_state_dict, vlm_state_dict

from .conftest import random_images

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model) -> Path:
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny")


def test_save_load_is_bit_exact(saved, tiny_model, prepared):
    loaded = load_checkpoint(saved)
    a, b = tiny_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.stats == tiny_model.stats
    r1, r2 = tiny_model.reason(prepared[:2]), loaded.reason(prepared[:2])
    assert [r.token_ids for r in r1] == [r.token_ids for r in r2]
    s = np.zeros((2, 8), np.float32)
    assert np.array_equal(tiny_model.sample_actions(r1, s, seeds=[1, 2]), loaded.sample_actions(r2, s, seeds=[1, 2]))


def test_layout_is_what_vllm_loads(saved):
    names = set(load_file(str(saved / "model.safetensors")))
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert "model.layers.0.mlp.gate.weight" in names
    assert "model.layers.0.mlp.gate.bias" in names  # the authors' router has a bias; so do the presets
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in names
    assert "visual.patch_embed.proj.weight" in names and "lm_head.weight" in names
    assert not any(n.startswith("policy_head") for n in names)
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["architectures"] == ["ChatVLA2ForConditionalGeneration"]
    assert cfg["text_config"]["num_experts"] == 4 and cfg["text_config"]["num_experts_per_tok"] == 2
    assert cfg["text_config"]["router_bias"] is True  # the vLLM plugin builds its gate with a bias from this
    expert = set(load_file(str(saved / "expert" / "model.safetensors")))
    for n in ("policy_head.t_embedder.mlp.0.weight", "policy_head.norm_after_pool.weight",
              "policy_head.cond_obs_emb.weight", "policy_head.cond_reasoning_emb.weight",
              "policy_head.x_embedder.weight", "policy_head.pos_embed",
              "policy_head.blocks.0.adaLN_modulation.1.weight",
              "policy_head.blocks.0.attn.q.weight", "policy_head.blocks.0.attn.kv.weight",
              "policy_head.blocks.0.attn.proj.weight", "policy_head.blocks.0.mlp.fc1.weight",
              "policy_head.blocks.0.mlp.fc2.weight", "policy_head.final_layer.linear.weight",
              "input_action_proj.mlps.0.weight", "reasoning_action_proj.mlps.2.weight"):
        assert n in expert, n


def test_config_json_round_trip(saved):
    cfg = ChatVLAConfig.from_hf_dict(json.loads((saved / "config.json").read_text()))
    assert cfg.with_updates(init_seed=tiny().init_seed) == tiny()


def _copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "c"))


@pytest.mark.parametrize("missing", ["config.json", "stats.json", "tokenizer.json", "model.safetensors",
                                     "expert/model.safetensors"])
def test_missing_file_is_named(saved, tmp_path, missing):
    d = _copy(saved, tmp_path)
    (d / missing).unlink()
    with pytest.raises(CheckpointError, match=re.escape(missing)):
        load_checkpoint(d)


def test_truncated_weights_are_reported(saved, tmp_path):
    d = _copy(saved, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(d)


def test_mismatched_tensor_names_expected_and_found_shape(saved, tmp_path):
    d = _copy(saved, tmp_path)
    sd = load_file(str(d / "expert" / "model.safetensors"))
    sd["policy_head.pos_embed"] = torch.zeros(1, 9, 128)
    save_file(sd, str(d / "expert" / "model.safetensors"))
    expected = r"policy_head\.pos_embed has shape \[1, 9, 128\], expected \[1, 16, 128\]"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(d)


def test_missing_tensor_is_named(saved, tmp_path):
    d = _copy(saved, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.2.mlp.gate.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.mlp\.gate\.weight"):
        load_checkpoint(d)


def test_bad_stats_are_reported(saved, tmp_path):
    d = _copy(saved, tmp_path)
    stats = json.loads((d / "stats.json").read_text())
    stats["action_min"] = stats["action_min"][:3]
    (d / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(CheckpointError, match="action_min has 3 values"):
        load_checkpoint(d)


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a shipped model"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="configuration only"):
        load_model("chatvla2-2b")


def test_dense_conversion_starts_experts_as_copies_and_keeps_the_function():
    dense_cfg = tiny().with_updates(moe=MoEConfig(kind="dense"))
    dense = build_model(dense_cfg)
    routed_only = tiny().with_updates(moe=MoEConfig(kind="dynamic", num_routed_experts=4, top_k=2,
                                                     num_shared_experts=0))
    sd = dense_to_moe_state_dict(vlm_state_dict(dense.vlm), routed_only)
    g, u = sd["model.layers.1.mlp.experts.gate_up_proj"].chunk(2, dim=1)
    assert torch.equal(g[3], dense.vlm.model.language_model.layers[1].mlp.gate_proj.weight)
    assert torch.equal(u[0], dense.vlm.model.language_model.layers[1].mlp.up_proj.weight)
    moe = build_model(routed_only)
    from chatvla.model.vlm import module_name

    moe.vlm.load_state_dict({module_name(k): v for k, v in sd.items()})
    p = dense.prepare(random_images(dense, 3), "convert me")
    a, b = dense.prefill([p], ["pick the card"])[0], moe.prefill([p], ["pick the card"])[0]
    torch.testing.assert_close(a.prompt_hidden, b.prompt_hidden, rtol=1e-4, atol=1e-4)


def test_dense_conversion_writes_a_zero_router_bias_when_the_config_has_one():
    dense = build_model(tiny().with_updates(moe=MoEConfig(kind="dense")))
    cfg = tiny().with_updates(moe=replace(tiny().moe, expert_intermediate_size=None))
    assert cfg.moe.router_bias
    sd = dense_to_moe_state_dict(vlm_state_dict(dense.vlm), cfg)
    assert torch.equal(sd["model.layers.3.mlp.gate.bias"], torch.zeros(4))
    from chatvla.model.vlm import module_name

    build_model(cfg).vlm.load_state_dict({module_name(k): v for k, v in sd.items()}, strict=True)


def test_seeded_router_bias_is_zero_and_leaves_the_other_weights_unchanged():
    """Adding the bias to the presets must not re-draw the seeded weights (init skips biases)."""
    with_bias, without = build_model(tiny()), build_model(tiny().with_updates(moe=replace(tiny().moe,
                                                                                          router_bias=False)))
    a, b = with_bias.vlm.state_dict(), without.vlm.state_dict()
    assert set(a) - set(b) == {f"model.language_model.layers.{i}.mlp.gate.bias" for i in range(4)}
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert all(not a[k].any() for k in set(a) - set(b))


def test_two_billion_preset_parameter_counts():
    counts = parameter_counts(PRESETS["chatvla2-2b"]())
    assert counts["vision"] == 665_271_296  # Qwen2-VL-2B's vision tower
    assert counts["total"] > counts["active_per_token"] > 3e9
    small = parameter_counts(tiny())
    assert 1e6 < small["total"] < 1e7  # "a few million parameters"


def test_tiny_tokenizer_rebuilds_identically():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_tokenizer.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_reasoning_refresh_the_model_was_trained_for_travels_with_it_to_the_engine(saved, tmp_path):
    """A checkpoint without the keys (every one written before them) asks for text every observation;
    one that names a refresh gets it through config.json into the engine's info, where the server
    takes its default policy from; a nonsense one is refused at load."""
    from chatvla.engines.torch_engine import TorchEngine

    assert TorchEngine(load_model(saved)).info.reasoning_refresh == (1, 0.0)
    ckpt = _copy(saved, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["chatvla"]["reasoning"].update(refresh_every_n=1000, refresh_every_seconds=4.0)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert TorchEngine(load_model(ckpt)).info.reasoning_refresh == (1000, 4.0)
    cfg["chatvla"]["reasoning"]["refresh_every_n"] = 0
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((CheckpointError, ValueError), match="refresh_every_n"):
        load_model(ckpt)
