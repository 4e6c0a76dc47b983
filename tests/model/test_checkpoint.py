"""Checkpoint directories: bit-exact round trips, clear errors, the authors' importer, conversion."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from chatvla.model import build_model, load_model
from chatvla.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from chatvla.model.config import ChatVLAConfig, MoEConfig
from chatvla.model.importer import ImportError_, import_authors_checkpoint
from chatvla.model.presets import PRESETS, parameter_counts, tiny
from chatvla.model.vlm import dense_to_moe_state_dict, vlm_state_dict
from chatvla.profiles import FRANKA_JOINT

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
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in names
    assert "visual.patch_embed.proj.weight" in names and "lm_head.weight" in names
    assert not any(n.startswith("policy_head") for n in names)
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["architectures"] == ["ChatVLA2ForConditionalGeneration"]
    assert cfg["text_config"]["num_experts"] == 4 and cfg["text_config"]["num_experts_per_tok"] == 2
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
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="configuration only"):
        load_model("chatvla2-2b")


# --- the authors' layout ------------------------------------------------------------------------------------

def _authors_layout(model, root: Path) -> Path:
    """Write `model` the way the authors' training code saves a ChatVLA-2 run (see importer docstring)."""
    run = root / "run"
    ck = run / "checkpoint-1000"
    ck.mkdir(parents=True)
    cfg = model.cfg
    tc = cfg.vlm["text_config"]
    flat = {k: v for k, v in tc.items() if k != "rope_parameters"}
    flat.update(model_type="qwen2_vla", rope_theta=tc["rope_parameters"]["rope_theta"],
                rope_scaling={"type": "mrope", "mrope_section": tc["rope_parameters"]["mrope_section"]},
                vision_config=cfg.vlm["vision_config"], tie_word_embeddings=False,
                policy_head_type="dit_diffusion_policy", routed_top_k=2, shared_expert_num=1,
                policy_head_config={"num_heads": cfg.expert.num_heads},
                **{k: cfg.vlm[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id")})
    (ck / "config.json").write_text(json.dumps(flat))
    tensors = {}
    for k, v in vlm_state_dict(model.vlm).items():
        if ".mlp.experts.gate_up_proj" in k:
            pre = k[: -len("experts.gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                tensors[f"{pre}experts.{e}.gate_proj.weight"] = v[e, :inter].clone()
                tensors[f"{pre}experts.{e}.up_proj.weight"] = v[e, inter:].clone()
        elif ".mlp.experts.down_proj" in k:
            pre = k[: -len("experts.down_proj")]
            for e in range(v.shape[0]):
                tensors[f"{pre}experts.{e}.down_proj.weight"] = v[e].clone()
        elif k.endswith(".mlp.gate.weight"):
            tensors[k.replace(".mlp.gate.", ".mlp.router.topkroute_linear.")] = v
        elif ".mlp.shared_expert." in k:
            tensors[k.replace(".shared_expert.", ".shared_experts.0.")] = v
        else:
            tensors[k] = v
    for k, v in model.expert.state_dict().items():
        tensors[k] = v
    tensors["policy_head.hidden_states_for_cosattn.weight"] = torch.zeros(4, 4)  # unused by ChatVLA-2
    half = len(tensors) // 2
    names = sorted(tensors)
    save_file({k: tensors[k].contiguous() for k in names[:half]}, str(ck / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k].contiguous() for k in names[half:]}, str(ck / "model-00002-of-00002.safetensors"))
    shutil.copy(Path(__file__).resolve().parents[2] / "src/chatvla/model/assets/tiny_tokenizer/tokenizer.json", ck)
    s = model.stats
    with (run / "dataset_stats.pkl").open("wb") as f:
        pickle.dump({"action_min": np.array(s.action_min), "action_max": np.array(s.action_max),
                     "qpos_mean": np.array(s.state_mean), "qpos_std": np.array(s.state_std),
                     "example_qpos": np.zeros(8)}, f)
    return ck


def test_importer_round_trips_an_authors_layout(tmp_path, tiny_model, prepared):
    src = _authors_layout(tiny_model, tmp_path)
    with pytest.raises(ImportError_, match="--trust-pickle"):
        import_authors_checkpoint(src, tmp_path / "out", profile=FRANKA_JOINT)
    out = import_authors_checkpoint(src, tmp_path / "out", profile=FRANKA_JOINT, trust_pickle=True)
    m = load_checkpoint(out)
    assert m.cfg.moe.kind == "dynamic" and m.cfg.moe.num_experts == 4 and m.cfg.moe.num_shared_experts == 1
    assert m.cfg.expert.timestep_freq_dtype == "bfloat16"
    a = tiny_model.reason(prepared[:2])
    assert m.cfg.reasoning.max_new_tokens == 256  # the authors' bound
    b = m.reason(prepared[:2], max_new_tokens=tiny_model.cfg.reasoning.max_new_tokens)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x.reasoning_hidden, y.reasoning_hidden)
    # Identical weights; only the (documented) bf16 timestep rounding differs in the expert.
    sd_a, sd_b = tiny_model.expert.state_dict(), m.expert.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert m.stats == tiny_model.stats


def test_importer_rejects_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ImportError_, match="qwen2_vla"):
        import_authors_checkpoint(tmp_path, tmp_path / "o", profile=FRANKA_JOINT, trust_pickle=True)


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
