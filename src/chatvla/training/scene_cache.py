"""Rendered scenes kept on disk, so a resumed or a follow-up run does not render them again.

Rendering 6,000 math-matching scenes takes 7-14 minutes of a 2-core machine's time, every run and every
resume. The scenes depend only on (task kind, robot profile, count, seed, first task seed), and the file
names say so: one directory can hold the scenes of several runs, and a run finds its own or renders
them. Images go to safetensors (uint8, one tensor per camera), everything else to JSON: nothing is
pickled.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from chatvla.training.data import Scene

FORMAT_VERSION = 1


def cache_name(kind: str, profile: str, n: int, seed: int, first_task_seed: int) -> str:
    """The file stem that names what the scenes were rendered from."""
    return f"scenes-v{FORMAT_VERSION}-{kind}-{profile}-n{n}-seed{seed}-first{first_task_seed}"


def save_scenes(scenes: list[Scene], directory: Path, name: str) -> None:
    """Writes `name`.safetensors (images) and `name`.json (the rest); the JSON last, and both through a
    temporary name, so a run cut short leaves no cache that looks whole."""
    if not scenes:
        return
    directory.mkdir(parents=True, exist_ok=True)
    cams = list(scenes[0].images)
    if any(list(s.images) != cams for s in scenes):
        raise ValueError("scenes disagree on their cameras: not cached")
    tensors = {cam: np.stack([s.images[cam] for s in scenes]) for cam in cams}
    meta = {"format_version": FORMAT_VERSION, "cameras": cams, "scenes": [{
        "pairs": [list(p) for p in s.pairs], "instruction": s.instruction, "reasoning": s.reasoning,
        "card_pixels": None if s.card_pixels is None else
        {cam: {str(n): list(xy) for n, xy in px.items()} for cam, px in s.card_pixels.items()},
        "card_places": None if s.card_places is None else {str(n): list(xy) for n, xy in s.card_places.items()},
    } for s in scenes]}
    images, index = directory / f"{name}.safetensors", directory / f"{name}.json"
    save_file(tensors, str(images) + ".tmp")
    os.replace(str(images) + ".tmp", images)
    tmp = Path(str(index) + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, index)


def load_scenes(directory: Path, name: str) -> list[Scene] | None:
    """The cached scenes, or None when there are none (or they are from another format, or torn: then
    the caller renders them again and says why)."""
    images, index = directory / f"{name}.safetensors", directory / f"{name}.json"
    if not index.is_file() or not images.is_file():
        return None
    try:
        meta = json.loads(index.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            return None
        tensors = load_file(str(images))
        cams = meta["cameras"]
        out = []
        for i, s in enumerate(meta["scenes"]):
            pixels = s["card_pixels"]
            places = s["card_places"]
            out.append(Scene(
                {cam: tensors[cam][i] for cam in cams}, [(q, a) for q, a in s["pairs"]], s["instruction"],
                s["reasoning"],
                None if pixels is None else
                {cam: {int(n): (float(xy[0]), float(xy[1])) for n, xy in px.items()} for cam, px in pixels.items()},
                None if places is None else {int(n): (float(xy[0]), float(xy[1])) for n, xy in places.items()}))
        if any(tensors[cam].shape[0] != len(out) for cam in cams):
            raise ValueError("image count and index disagree")
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        print(f"[data] scene cache {index} unreadable ({e}): rendering again", file=sys.stderr)
        return None
