"""Task descriptions shared by both tasks: what is on the table, what to say, and how to judge it.

A task is pure data plus geometry: it knows nothing about MuJoCo, so its success check can be tested
with hand-made poses and reused for a real robot with a pose tracker. Everything is expressed in the
*task frame*: origin at the centre of the workspace on the table top, +x away from the robot, +y to
the robot's left, +z up. A rig decides where that frame sits in its world.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np

from chatvla.client.sim.catalog import Shape, Split

# The part of the table objects are spawned on; both rigs reach all of it with a top-down grasp.
WORKSPACE_X = (-0.11, 0.11)
WORKSPACE_Y = (-0.24, 0.24)


@dataclass(frozen=True)
class ObjectSpec:
    """A movable object (it gets a free joint). `label` is a number printed on its top face."""

    name: str
    shape: Shape
    size: tuple[float, ...]
    rgba: tuple[float, float, float, float]
    xy: tuple[float, float]
    yaw: float
    rest_z: float
    label: int | None = None
    mass: float = 0.05


@dataclass(frozen=True)
class FixtureSpec:
    """Something that does not move: the whiteboard (shows `text`) or a target zone (a coloured patch
    on the table). `half_size` is the half extent in x and y of the zone, or of the board's face."""

    name: str
    kind: Literal["whiteboard", "zone"]
    xy: tuple[float, float]
    half_size: tuple[float, float]
    rgba: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    text: str = ""


@dataclass(frozen=True, eq=False)
class Pose:
    """Position (m) and rotation matrix of an object's centre in the task frame."""

    pos: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))

    @staticmethod
    def at(x: float, y: float, z: float, yaw: float = 0.0) -> Pose:
        c, s = math.cos(yaw), math.sin(yaw)
        return Pose(np.array([x, y, z], float), np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]))


@dataclass(frozen=True)
class TaskResult:
    success: bool
    reason: str


@dataclass(frozen=True)
class Task(abc.ABC):
    """One episode's setup. Subclasses add their own parameters and implement `check`."""

    kind: ClassVar[str]
    seed: int
    split: Split
    instruction: str
    objects: tuple[ObjectSpec, ...]
    fixtures: tuple[FixtureSpec, ...]

    def object(self, name: str) -> ObjectSpec:
        for o in self.objects:
            if o.name == name:
                return o
        raise KeyError(f"task has no object {name!r}; it has {[o.name for o in self.objects]}")

    def initial_poses(self) -> dict[str, Pose]:
        return {o.name: Pose.at(o.xy[0], o.xy[1], o.rest_z, o.yaw) for o in self.objects}

    @abc.abstractmethod
    def check(self, poses: Mapping[str, Pose]) -> TaskResult:
        """Judge the scene from object poses (task frame). Pure geometry, no physics engine."""

    @abc.abstractmethod
    def oracle_goal(self) -> tuple[str, tuple[float, float]]:
        """The object a scripted expert should move and the table point (task frame) to put it on."""


def resting(pose: Pose, rest_z: float, tol: float = 0.015) -> bool:
    """On the table, not held up in the air (or knocked through it)."""
    return abs(float(pose.pos[2]) - rest_z) <= tol


def sample_layout(
    rng: np.random.Generator,
    radii: Sequence[float],
    *,
    gap: float = 0.015,
    fixed: Sequence[tuple[float, float, float]] = (),
    tries: int = 200,
    restarts: int = 100,
) -> list[tuple[float, float]]:
    """Centres for discs of the given radii inside the workspace, apart from each other and from the
    `fixed` (x, y, r) discs. Rejection sampling, restarted from scratch when an early disc leaves no
    room for a later one; deterministic for a given generator state."""
    for _ in range(restarts):
        placed: list[tuple[float, float, float]] = list(fixed)
        out: list[tuple[float, float]] = []
        for r in radii:
            for _ in range(tries):
                x = float(rng.uniform(WORKSPACE_X[0] + r * 0.5, WORKSPACE_X[1] - r * 0.5))
                y = float(rng.uniform(WORKSPACE_Y[0] + r * 0.5, WORKSPACE_Y[1] - r * 0.5))
                if all(math.hypot(x - px, y - py) >= r + pr + gap for px, py, pr in placed):
                    placed.append((x, y, r))
                    out.append((round(x, 4), round(y, 4)))
                    break
            else:
                break
        else:
            return out
    raise RuntimeError("could not lay out the objects; the workspace is too crowded")
