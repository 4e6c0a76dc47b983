"""The paper's two tasks, as seeded generators: `make_task(kind, seed, split)`."""

from __future__ import annotations

from chatvla.client.sim.tasks.base import FixtureSpec, ObjectSpec, Pose, Task, TaskResult
from chatvla.client.sim.tasks.math_matching import MathMatchingTask, make_math_matching
from chatvla.client.sim.tasks.toy_placement import ToyPlacementTask, make_toy_placement

TASK_KINDS: tuple[str, ...] = ("math_matching", "toy_placement")


def make_task(kind: str, seed: int, split: str = "train", **options: int) -> Task:
    """Build a task; `options` go to the kind's generator (`n_cards`, `n_distractors`)."""
    if kind == "math_matching":
        return make_math_matching(seed, split, **options)
    if kind == "toy_placement":
        return make_toy_placement(seed, split, **options)
    raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(TASK_KINDS)}")


__all__ = [
    "TASK_KINDS",
    "FixtureSpec",
    "MathMatchingTask",
    "ObjectSpec",
    "Pose",
    "Task",
    "TaskResult",
    "ToyPlacementTask",
    "make_math_matching",
    "make_task",
    "make_toy_placement",
]
