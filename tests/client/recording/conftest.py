"""Builders for small, deterministic episode files."""

from __future__ import annotations

import numpy as np
import pytest

from chatvla.client.recording import ChunkRecord, EpisodeWriter
from chatvla.profiles import FRANKA_JOINT

CHUNK_EVERY = 8


def trajectory(n: int) -> np.ndarray:
    """A smooth joint trajectory around home, [n, 8] float32."""
    home = np.array(FRANKA_JOINT.home, dtype=np.float64)
    t = np.arange(n)[:, None] / 15.0
    phase = np.arange(8)[None, :]
    a = home + 0.2 * np.sin(2 * np.pi * 0.5 * t + phase)
    a[:, 7] = np.where(np.arange(n) < n // 2, 0.08, 0.01)
    return np.clip(a, FRANKA_JOINT.action_lower, FRANKA_JOINT.action_upper).astype(np.float32)


def write_episode(path, n: int = 40, *, encoding: str = "jpeg", close: bool = True, **kw) -> np.ndarray:
    rng = np.random.default_rng(0)
    acts = trajectory(n)
    front = rng.integers(0, 255, size=(32, 48, 3), dtype=np.uint8)
    wrist = np.full((24, 24, 3), 200, dtype=np.uint8)
    w = EpisodeWriter(
        path,
        FRANKA_JOINT,
        instruction="place the card showing 3+4 on the target",
        task={"name": "math_matching", "a": 3, "b": 4, "held_out": False},
        image_encoding=encoding,
        **kw,
    )
    for t in range(n):
        chunk = None
        if t % CHUNK_EVERY == 0:
            chunk = ChunkRecord(
                seq=t // CHUNK_EVERY,
                tick=max(0, t - 2),
                actions=np.repeat(acts[t : t + 1], FRANKA_JOINT.chunk_size, axis=0),
                reasoning=f"The board shows 3+4, so the answer is 7. Step {t}.",
                timings={"queue": 1.0, "reasoning": 40.0 + t, "expert": 12.0},
            )
        w.append(
            tick=t,
            timestamp=100.0 + t / FRANKA_JOINT.control_rate_hz,
            state=acts[t - 1] if t else acts[0],
            action=acts[t],
            images={"front": front, "wrist": wrist},
            chunk=chunk,
            stall=t in (5, 6),
            interventions=["step_limit"] if t == 9 else [],
        )
    if close:
        w.close(outcome={"success": False, "reason": "untrained model"})
    else:
        w._f.flush()  # what a crash leaves: everything up to the last record, no end record
    return acts


@pytest.fixture
def episode_file(tmp_path):
    path = tmp_path / "ep.chatvla"
    acts = write_episode(path)
    return path, acts


@pytest.fixture
def make_episode():
    """make_episode(path, n=..., encoding=..., close=...) -> executed actions [n, 8]."""
    return write_episode
