"""Checkpoint directories: save, load, and clear errors when something is missing or mis-shaped.

    config.json               HF Qwen2-VL config + MoE keys (vLLM reads it) + our "chatvla" section
    model.safetensors         the VLM, on-disk names (model.layers.*, visual.*, lm_head.*)
    expert/model.safetensors  projectors + DiT head (kept out of the top level so vLLM's loader,
                              which globs *.safetensors there, never sees them)
    stats.json                normalisation stats (JSON: nothing is ever unpickled at serve time)
    tokenizer.json, tokenizer_config.json, preprocessor_config.json, generation_config.json
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chatvla.model.chatvla2 import ChatVLA2
from chatvla.model.config import ChatVLAConfig, NormStats
from chatvla.model.processor import CHAT_TEMPLATE
from chatvla.model.tokenizer import load_tokenizer, save_tokenizer
from chatvla.model.vlm import module_name, vlm_state_dict

CONFIG = "config.json"
VLM_WEIGHTS = "model.safetensors"
EXPERT_WEIGHTS = "expert/model.safetensors"
STATS = "stats.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file or tensor."""


def save_checkpoint(model: ChatVLA2, directory: str | Path) -> Path:
    d = Path(directory)
    (d / "expert").mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    # A saved checkpoint carries its weights: drop the seed so loading never re-draws them.
    cfg_saved = cfg.with_updates(init_seed=None)
    (d / CONFIG).write_text(json.dumps(cfg_saved.to_hf_dict(), indent=2) + "\n")
    save_file(vlm_state_dict(model.vlm), str(d / VLM_WEIGHTS), metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in model.expert.state_dict().items()}, str(d / EXPERT_WEIGHTS),
              metadata={"format": "pt"})
    if model.stats is not None:
        (d / STATS).write_text(json.dumps(model.stats.to_dict(), indent=2) + "\n")
    save_tokenizer(model.prompts.tokenizer, d, chat_template=CHAT_TEMPLATE)
    ip = model.prompts.image_processor
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "min_pixels": cfg.reasoning.min_pixels,
        "max_pixels": cfg.reasoning.max_pixels,
        "size": {"shortest_edge": cfg.reasoning.min_pixels, "longest_edge": cfg.reasoning.max_pixels},
        "patch_size": ip.patch_size,
        "temporal_patch_size": ip.temporal_patch_size,
        "merge_size": ip.merge_size,
        "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std),
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
    }, indent=2) + "\n")
    tc = cfg.vlm["text_config"]
    (d / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [model.prompts.eos_id, model.prompts.pad_id],
        "pad_token_id": model.prompts.pad_id,
        "bos_token_id": tc.get("bos_token_id"),
        "do_sample": False,
    }, indent=2) + "\n")
    return d


def read_config(directory: str | Path) -> ChatVLAConfig:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return ChatVLAConfig.from_hf_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_stats(directory: str | Path, cfg: ChatVLAConfig) -> NormStats:
    path = Path(directory) / STATS
    if not path.is_file():
        raise CheckpointError(f"missing file {path} (normalisation stats)")
    try:
        stats = NormStats.from_dict(json.loads(path.read_text()))
        stats.check(cfg.expert.action_dim, cfg.expert.state_dim, cfg.expert.chunk_size)
    except (ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return stats


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> ChatVLA2:
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    cfg = read_config(d)
    stats = read_stats(d, cfg)
    try:
        tok = load_tokenizer(d)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    for rel in (VLM_WEIGHTS, EXPERT_WEIGHTS):
        if not (d / rel).is_file():
            raise CheckpointError(f"missing file {d / rel}")
    model = empty_model(cfg, tok, stats, device=device)
    vlm_sd = {module_name(k): v for k, v in _read_tensors(d / VLM_WEIGHTS).items()}
    if model.vlm.config.tie_word_embeddings:
        vlm_sd.setdefault("lm_head.weight", vlm_sd.get("model.language_model.embed_tokens.weight"))
    _load_strict(model.vlm, vlm_sd, d / VLM_WEIGHTS, key_to_file=_vlm_file_key)
    _load_strict(model.expert, _read_tensors(d / EXPERT_WEIGHTS), d / EXPERT_WEIGHTS)
    if model.vlm.config.tie_word_embeddings:
        model.vlm.lm_head.weight = model.vlm.model.language_model.embed_tokens.weight
    model.to(device=device, dtype=dtype)
    model.eval()
    return model


def empty_model(cfg: ChatVLAConfig, tok, stats: NormStats, *, device: str | torch.device = "cpu") -> ChatVLA2:
    """Allocate the model without drawing initial weights (they are about to be overwritten)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return ChatVLA2(cfg.with_updates(init_seed=None), tok, stats, device=device)


def _vlm_file_key(k: str) -> str:
    from chatvla.model.vlm import checkpoint_name

    return checkpoint_name(k)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None


def _load_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor | None], path: Path,
                 key_to_file=lambda k: k) -> None:
    """Copy tensors into `module`, naming the first missing, unexpected or mis-shaped one."""
    expected = dict(module.state_dict())
    for k, param in expected.items():
        t = sd.get(k)
        if t is None:
            raise CheckpointError(f"{path}: missing tensor {key_to_file(k)} (expected shape {list(param.shape)})")
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{path}: tensor {key_to_file(k)} has shape {list(t.shape)}, expected {list(param.shape)}"
            )
    extra = sorted(set(k for k, v in sd.items() if v is not None) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {key_to_file(extra[0])} (and {len(extra) - 1} more)"
                              if len(extra) > 1 else f"{path}: unexpected tensor {key_to_file(extra[0])}")
    module.load_state_dict({k: sd[k] for k in expected}, strict=True)


def load_action_expert(directory: str | Path, *, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32):
    """Only the action expert (projectors + DiT + sampler + stats) of a checkpoint, for engines whose VLM
    runs elsewhere (vLLM): the VLM weights are never read."""
    from transformers.initialization import no_init_weights

    from chatvla.model.action_expert import ActionExpert

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    cfg = read_config(d)
    stats = read_stats(d, cfg)
    if not (d / EXPERT_WEIGHTS).is_file():
        raise CheckpointError(f"missing file {d / EXPERT_WEIGHTS}")
    with no_init_weights(), torch.device(device):
        expert = ActionExpert(cfg.expert, cfg.sampler, cfg.hidden_size)
    _load_strict(expert, _read_tensors(d / EXPERT_WEIGHTS), d / EXPERT_WEIGHTS)
    expert.to(device=device, dtype=dtype)
    expert.set_stats(stats)
    return cfg, expert.eval()
