"""Fixtures for the model tests: the tiny preset, built once per session (about 0.1 s)."""

from __future__ import annotations

import numpy as np
import pytest

from chatvla.model import ChatVLA2, build_model
from chatvla.model.presets import tiny


@pytest.fixture(scope="session")
def tiny_model() -> ChatVLA2:
    return build_model(tiny())


def random_images(model: ChatVLA2, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in model.cfg.profile.cameras}


@pytest.fixture(scope="session")
def prepared(tiny_model):
    instr = ["pick up the red block", "put the card 21 on the plate", "move the toy car left of the cup",
             "stack the blue cup on the box"]
    return [tiny_model.prepare(random_images(tiny_model, i), instr[i]) for i in range(4)]
