"""The authors' checkpoint importer, on synthetic checkpoints laid out exactly as theirs.

Their ChatVLA-2 code (qwen2_vla `Qwen2VLDecoderLayer`, `SharedRoutedMoE`, `NoisyTopkRouter`,
`StaticMoE`) saves each decoder layer's MoE as
`model.layers.N.share_moe_expert.{shared_experts.J, routed_experts.router.topkroute_linear,
routed_experts.experts.E}.*` or, for ChatVLA v1, `model.layers.N.static_expert.experts.{0,1}.*`,
with a flat `config.json` (`model_type: qwen2_vla`) carrying their training flags. The reference
computation below follows their forward pass, not ours: router logits with bias, top-k, softmax over
the kept logits (the rest at -inf), every routed expert weighted by its probability, every shared
expert summed.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from chatvla.model import build_model
from chatvla.model.checkpoint import load_checkpoint
from chatvla.model.config import MoEConfig
from chatvla.model.importer import ImportError_, import_authors_checkpoint
from chatvla.model.presets import tiny_chatvla1
from chatvla.model.vlm import moe_blocks, vlm_state_dict
from chatvla.profiles import FRANKA_JOINT

from .conftest import random_images

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "src/chatvla/model/assets/tiny_tokenizer/tokenizer.json"


# --- writing a checkpoint the way the authors' training code saves one ---------------------------------------

def _flat_config(model, **flags) -> dict:
    """Their flat qwen2_vla config.json: text fields at the top level plus their `model_args` flags."""
    cfg = model.cfg
    tc = cfg.vlm["text_config"]
    flat = {k: v for k, v in tc.items() if k != "rope_parameters"}
    flat.update(model_type="qwen2_vla", rope_theta=tc["rope_parameters"]["rope_theta"],
                rope_scaling={"type": "mrope", "mrope_section": tc["rope_parameters"]["mrope_section"]},
                vision_config=cfg.vlm["vision_config"], tie_word_embeddings=False,
                policy_head_type="dit_diffusion_policy", policy_head_config={"num_heads": cfg.expert.num_heads},
                using_film=False, using_groot_like_attn=False, using_deepseek_moe=False, using_deepspeed_moe=False,
                **{k: cfg.vlm[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id")})
    flat.update(flags)
    return flat


def _dynamic_flags(routed: int, shared: int, top_k: int | None) -> dict:
    flags = dict(using_moe=True, using_shared_routed_expert=True, using_static_expert=False,
                 routed_expert_num=routed, shared_expert_num=shared)
    if top_k is not None:
        flags["routed_top_k"] = top_k
    return flags


def _authors_vlm_tensors(model) -> dict[str, torch.Tensor]:
    """Our fused MoE tensors split back into the authors' one-module-per-expert names."""
    moe = model.cfg.moe
    out: dict[str, torch.Tensor] = {}
    for k, v in vlm_state_dict(model.vlm).items():
        m = re.match(r"^(model\.layers\.(\d+)\.)mlp\.(.+)$", k)
        if m is None or not moe.applies_to(int(m[2])):
            out[k] = v
            continue
        pre, rest = m[1], m[3]
        experts = pre + ("static_expert.experts" if moe.kind == "static" else "share_moe_expert.routed_experts.experts")
        if rest == "experts.gate_up_proj":
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                out[f"{experts}.{e}.gate_proj.weight"] = gate[e].clone()
                out[f"{experts}.{e}.up_proj.weight"] = up[e].clone()
        elif rest == "experts.down_proj":
            for e in range(v.shape[0]):
                out[f"{experts}.{e}.down_proj.weight"] = v[e].clone()
        elif rest in ("gate.weight", "gate.bias"):
            out[f"{pre}share_moe_expert.routed_experts.router.topkroute_linear.{rest[5:]}"] = v
        elif rest.startswith("shared_expert."):
            proj = rest.split(".")[1]
            parts = v.chunk(moe.num_shared_experts, dim=1 if proj == "down_proj" else 0)
            for j, part in enumerate(parts):
                out[f"{pre}share_moe_expert.shared_experts.{j}.{proj}.weight"] = part.clone()
        else:
            raise AssertionError(f"unexpected MoE tensor {k}")
    return out


def _write_run(root: Path, config: dict, tensors: dict[str, torch.Tensor], model=None) -> Path:
    """`run/checkpoint-1000/` (two safetensors shards, config, tokenizer) + `run/dataset_stats.pkl`."""
    ck = root / "run" / "checkpoint-1000"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    half = max(1, len(names) // 2)
    save_file({k: tensors[k].contiguous() for k in names[:half]}, str(ck / "model-00001-of-00002.safetensors"))
    if names[half:]:
        save_file({k: tensors[k].contiguous() for k in names[half:]}, str(ck / "model-00002-of-00002.safetensors"))
    shutil.copy(TOKENIZER, ck)
    if model is not None:
        s = model.stats
        with (root / "run" / "dataset_stats.pkl").open("wb") as f:
            pickle.dump({"action_min": np.array(s.action_min), "action_max": np.array(s.action_max),
                         "qpos_mean": np.array(s.state_mean), "qpos_std": np.array(s.state_std),
                         "example_qpos": np.zeros(8)}, f)
    return ck


def _authors_checkpoint(model, root: Path, vlm: dict[str, torch.Tensor] | None = None, **flags) -> Path:
    tensors = dict(_authors_vlm_tensors(model) if vlm is None else vlm)
    tensors.update(model.expert.state_dict())
    tensors["policy_head.hidden_states_for_cosattn.weight"] = torch.zeros(4, 4)  # unused by ChatVLA-2
    return _write_run(root, _flat_config(model, **flags), tensors, model)


# --- their forward pass, written from their module structure --------------------------------------------------

def _qwen2_mlp(x: torch.Tensor, t: dict[str, torch.Tensor], pre: str) -> torch.Tensor:
    g, u, d = (t[f"{pre}.{p}_proj.weight"] for p in ("gate", "up", "down"))
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


def _authors_shared_routed_moe(t: dict[str, torch.Tensor], layer: int, x: torch.Tensor, top_k: int,
                               *, use_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SharedRoutedMoE.forward on [T, H]: (output, top-k expert ids)."""
    pre = f"model.layers.{layer}.share_moe_expert."
    w = t[pre + "routed_experts.router.topkroute_linear.weight"]
    b = t[pre + "routed_experts.router.topkroute_linear.bias"]
    logits = F.linear(x, w, b if use_bias else None)
    top, idx = logits.topk(top_k, dim=-1)
    probs = torch.softmax(torch.full_like(logits, float("-inf")).scatter(-1, idx, top), dim=-1)
    out = torch.zeros_like(x)
    for e in range(w.shape[0]):
        chosen = (idx == e).any(dim=-1, keepdim=True)
        out = out + torch.where(chosen, probs[:, e:e + 1], 0.0) * _qwen2_mlp(x, t, f"{pre}routed_experts.experts.{e}")
    j = 0
    while f"{pre}shared_experts.{j}.gate_proj.weight" in t:
        out = out + _qwen2_mlp(x, t, f"{pre}shared_experts.{j}")
        j += 1
    return out, idx


def _random_shared_routed(model, *, routed: int, shared: int, inter: int, seed: int) -> dict[str, torch.Tensor]:
    """The model's non-MoE tensors + random authors'-layout MoE tensors (router bias of weight in the routing)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.cfg.hidden_size

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    out = {k: v for k, v in vlm_state_dict(model.vlm).items() if not re.match(r"model\.layers\.\d+\.mlp\.", k)}
    for i in range(model.cfg.vlm["text_config"]["num_hidden_layers"]):
        pre = f"model.layers.{i}.share_moe_expert."
        out[pre + "routed_experts.router.topkroute_linear.weight"] = rnd(routed, hidden, std=0.1)
        out[pre + "routed_experts.router.topkroute_linear.bias"] = rnd(routed, std=1.0)
        for name, n in ((pre + "routed_experts.experts", routed), (pre + "shared_experts", shared)):
            for e in range(n):
                out[f"{name}.{e}.gate_proj.weight"] = rnd(inter, hidden, std=0.1)
                out[f"{name}.{e}.up_proj.weight"] = rnd(inter, hidden, std=0.1)
                out[f"{name}.{e}.down_proj.weight"] = rnd(hidden, inter, std=0.1)
    return out


# --- imports that work ----------------------------------------------------------------------------------------

def test_importer_round_trips_an_authors_layout(tmp_path, tiny_model, prepared):
    moe = tiny_model.cfg.moe
    src = _authors_checkpoint(tiny_model, tmp_path, **_dynamic_flags(moe.num_routed_experts,
                                                                     moe.num_shared_experts, moe.top_k))
    with pytest.raises(ImportError_, match="--trust-pickle"):
        import_authors_checkpoint(src, tmp_path / "out", profile=FRANKA_JOINT)
    out = import_authors_checkpoint(src, tmp_path / "out", profile=FRANKA_JOINT, trust_pickle=True)
    m = load_checkpoint(out)
    assert m.cfg.moe == moe  # kind, 4 routed / top-2 / 1 shared, width 128, router bias: all from the checkpoint
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
    sd_a, sd_b = tiny_model.vlm.state_dict(), m.vlm.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert m.stats == tiny_model.stats


@pytest.mark.parametrize(("routed_top_k", "top_k"), [(None, 2), (0, 2), (3, 3)])
def test_imported_moe_block_computes_the_authors_shared_routed_moe(tmp_path, tiny_model, routed_top_k, top_k):
    """Random per-expert tensors in their names -> our fused block -> same output as their forward pass.

    Two shared experts (fused into one wider MLP), four routed ones of a width other than the
    dense MLP's, a router bias large enough to change the routing; top-k from `routed_top_k`, or
    routed_expert_num // 2 when it is 0 or absent (their training default)."""
    tensors = _random_shared_routed(tiny_model, routed=4, shared=2, inter=96, seed=7)
    src = _authors_checkpoint(tiny_model, tmp_path, vlm=tensors, **_dynamic_flags(4, 2, routed_top_k))
    m = load_checkpoint(import_authors_checkpoint(src, tmp_path / "out", profile=FRANKA_JOINT, trust_pickle=True))
    assert m.cfg.moe == MoEConfig(kind="dynamic", num_routed_experts=4, top_k=top_k, num_shared_experts=2,
                                  expert_intermediate_size=96, router_bias=True, layers=None)
    blocks = moe_blocks(m.vlm)
    assert len(blocks) == 4
    x = torch.randn(64, tiny_model.cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    for layer, block in enumerate(blocks):
        expected, idx = _authors_shared_routed_moe(tensors, layer, x, top_k)
        with torch.no_grad():
            got = block(x[None])[0]
        assert torch.equal(block.last_routing.sort(-1).values, idx.sort(-1).values)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # The bias matters here: without it some tokens would pick other experts.
        _, idx_no_bias = _authors_shared_routed_moe(tensors, layer, x, top_k, use_bias=False)
        assert not torch.equal(idx.sort(-1).values, idx_no_bias.sort(-1).values)


def test_chatvla1_static_moe_imports_with_understanding_and_control_experts(tmp_path):
    """`static_expert.experts.0` answers VQA (their eval_in_vqa) and `.1` controls the robot: our tasks in order."""
    model = build_model(tiny_chatvla1())
    src = _authors_checkpoint(model, tmp_path, using_moe=True, using_static_expert=True,
                              using_shared_routed_expert=False, routed_expert_num=0, shared_expert_num=0)
    tensors = _authors_vlm_tensors(model)
    assert "model.layers.0.static_expert.experts.1.down_proj.weight" in tensors
    m = load_checkpoint(import_authors_checkpoint(src, tmp_path / "out", profile=FRANKA_JOINT, trust_pickle=True))
    assert m.cfg.moe == MoEConfig(kind="static", num_routed_experts=2, top_k=1, num_shared_experts=0,
                                  expert_intermediate_size=256)
    assert m.cfg.moe.static_tasks == ("understanding", "control")
    x = torch.randn(2, 5, model.cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    for layer, block in enumerate(moe_blocks(m.vlm)):
        block.route_by_task = torch.tensor([0, 1])
        with torch.no_grad():
            got = block(x)
        for row, expert in ((0, 0), (1, 1)):
            ref = _qwen2_mlp(x[row], tensors, f"model.layers.{layer}.static_expert.experts.{expert}")
            torch.testing.assert_close(got[row], ref, rtol=1e-5, atol=1e-5)
    p = model.prepare(random_images(model, 5), "pick up the red block")
    assert [r.token_ids for r in model.reason([p])] == [r.token_ids for r in m.reason([p], max_new_tokens=12)]


def test_importer_rejects_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ImportError_, match="qwen2_vla"):
        import_authors_checkpoint(tmp_path, tmp_path / "o", profile=FRANKA_JOINT, trust_pickle=True)


# --- refusals: checkpoints that would load but compute something else ----------------------------------------

H = 8


def _layer(pre: str, n: int, inter: int = 4) -> dict[str, torch.Tensor]:
    return {f"{pre}.{e}.{p}_proj.weight": torch.zeros((inter, H) if p != "down" else (H, inter))
            for e in range(n) for p in ("gate", "up", "down")}


def _shared_routed(layer: int = 0, routed: int = 4, shared: int = 1) -> dict[str, torch.Tensor]:
    pre = f"model.layers.{layer}.share_moe_expert"
    t = {}
    if routed:  # SharedRoutedMoE builds no router without routed experts
        t = {f"{pre}.routed_experts.router.topkroute_linear.weight": torch.zeros(routed, H),
             f"{pre}.routed_experts.router.topkroute_linear.bias": torch.zeros(routed)}
    t.update(_layer(f"{pre}.routed_experts.experts", routed))
    t.update(_layer(f"{pre}.shared_experts", shared))
    return t


def _static(layer: int = 0) -> dict[str, torch.Tensor]:
    return _layer(f"model.layers.{layer}.static_expert.experts", 2)


def _minimal(tmp_path: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    """A config + weights only (no stats pickle): every refusal must come before the pickle is needed."""
    return _write_run(tmp_path, {"model_type": "qwen2_vla", "num_hidden_layers": 1, "hidden_size": H, **config},
                      tensors)


REFUSED = {
    "film flag": ({"using_film": True}, _shared_routed(), r"using_film: FiLM"),
    "film tensors": ({}, {**_shared_routed(), "reasoning_film.gamma.weight": torch.zeros(2)},
                     r"reasoning_film\.\*"),
    "groot-like attention": ({"using_groot_like_attn": True}, _shared_routed(), "using_groot_like_attn"),
    "deepseek flag": ({"using_moe": True, "using_deepseek_moe": True}, _shared_routed(),
                      "using_deepseek_moe: MoE variant DeepSeek-style sigmoid routing"),
    "deepseek tensors": ({}, {"model.layers.0.deepseek_expert.gate.weight": torch.zeros(4, H),
                              "model.layers.0.deepseek_expert.gate.bias": torch.zeros(4)},
                         r"deepseek_expert\.gate\.(weight|bias): MoE variant DeepSeek-style sigmoid routing"),
    "deepspeed tensors": ({}, {"model.layers.0.deepspeed_expert.deepspeed_moe.gate.wg.weight": torch.zeros(4, H)},
                          "MoE variant DeepSpeed MoE"),
    "static + routed flags": ({"using_moe": True, "using_static_expert": True, "using_shared_routed_expert": True},
                              {**_static(), **_shared_routed()}, r"MoE variant static \+ routed averaged"),
    "static + routed tensors": ({}, {**_static(), **_shared_routed()}, r"MoE variant static \+ routed averaged"),
    "noisy router": ({}, {**_shared_routed(),
                          "model.layers.0.share_moe_expert.routed_experts.router.noise_linear.weight":
                              torch.zeros(4, H)}, "noisy top-k router"),
    "shared experts only": ({}, _shared_routed(routed=0), "MoE variant 'shared experts only'"),
    "unknown module": ({}, {**_shared_routed(), "reasoning_adapter.weight": torch.zeros(2)},
                       r"unrecognised tensors \['reasoning_adapter\.weight'\]"),
    "unknown MoE tensor": ({}, {**_shared_routed(),
                                "model.layers.0.share_moe_expert.routed_experts.experts.0.gate_proj.bias":
                                    torch.zeros(4)}, "unrecognised MoE tensor"),
    "routed count": ({"routed_expert_num": 8}, _shared_routed(), "routed_expert_num is 8, but the tensors hold 4"),
    "shared count": ({"shared_expert_num": 2}, _shared_routed(), "shared_expert_num is 2, but the tensors hold 1"),
    "top-k": ({"routed_top_k": 5}, _shared_routed(), r"top-k 5 .* not in 1\.\.4"),
    "missing layer": ({"using_moe": True, "num_hidden_layers": 2}, _shared_routed(),
                      r"decoder layers \[1\] have no share_moe_expert"),
    "missing router": ({}, {k: v for k, v in _shared_routed().items() if "router" not in k},
                       r"missing tensor .*router\.topkroute_linear\.weight"),
    "missing expert": ({}, {k: v for k, v in _shared_routed().items() if "experts.2.up_proj" not in k},
                       r"missing tensor model\.layers\.0\.share_moe_expert\.routed_experts\.experts\.2\.up_proj"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_checkpoints_are_refused_naming_the_variant(tmp_path, case):
    config, tensors, message = REFUSED[case]
    src = _minimal(tmp_path, tensors, **config)
    with pytest.raises(ImportError_, match=message):
        import_authors_checkpoint(src, tmp_path / "out", profile=FRANKA_JOINT)
    assert not (tmp_path / "out").exists()
