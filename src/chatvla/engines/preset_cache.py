"""Seeded presets as checkpoint directories on disk, for engines that can only load directories (vLLM).

A preset is built from its configuration and a seed, so its directory is cached by a hash of the
configuration: the second engine start reuses it, and a changed preset gets a new directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("CHATVLA_CACHE_DIR", Path.home() / ".cache" / "chatvla"))


def preset_checkpoint(name: str) -> Path:
    """A seeded preset saved as a checkpoint directory (vLLM loads directories), cached by config hash."""
    from chatvla.model import load_model
    from chatvla.model.checkpoint import save_checkpoint
    from chatvla.model.presets import SEEDED_PRESETS, get_preset

    if name not in SEEDED_PRESETS:
        raise ValueError(f"preset {name!r} has no weights; pass a checkpoint directory")
    cfg = get_preset(name)
    digest = hashlib.sha256(json.dumps(cfg.to_hf_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    target = cache_dir() / "checkpoints" / f"{name}-{digest}"
    if (target / "config.json").is_file() and (target / "expert" / "model.safetensors").is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    save_checkpoint(load_model(name), tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote preset %s to %s", name, target)
    return target
