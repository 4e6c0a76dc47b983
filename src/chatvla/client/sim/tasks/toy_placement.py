"""Toy placement (ChatVLA-2): "put the A to the left of / right of / in front of / behind the B".

Directions are the robot's: "in front of B" is between B and the robot (-x), "behind" is beyond it
(+x), "left of" is the robot's left (+y). Success is judged from the relative pose: A must lie on the
table, displaced from B mostly along the named direction, neither touching B nor too far to count as
"next to" it, and B must still be about where it was."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from chatvla.client.sim.catalog import Toy, check_split, toys
from chatvla.client.sim.tasks.base import (
    WORKSPACE_X,
    WORKSPACE_Y,
    ObjectSpec,
    Pose,
    Task,
    TaskResult,
    resting,
    sample_layout,
)

Relation = Literal["left", "right", "front", "behind"]
RELATIONS: tuple[Relation, ...] = ("left", "right", "front", "behind")
DIRECTIONS: dict[Relation, tuple[float, float]] = {
    "left": (0.0, 1.0),
    "right": (0.0, -1.0),
    "front": (-1.0, 0.0),
    "behind": (1.0, 0.0),
}
PHRASES: dict[Relation, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "front": "in front of",
    "behind": "behind",
}

MIN_GAP = 0.01  # clearance between the two footprints
MAX_ALONG = 0.22  # farther than this is no longer "next to"
LATERAL_RATIO = 0.6  # |sideways| <= 0.6 * along: within ~31 degrees of the named direction
B_MAX_SHIFT = 0.05
GOAL_CLEARANCE = 0.03  # where the oracle aims: this much free space between the footprints


def toy_name(toy: Toy) -> str:
    return toy.name.replace(" ", "_")


@dataclass(frozen=True)
class ToyPlacementTask(Task):
    kind: ClassVar[str] = "toy_placement"
    subject: str = ""  # object names (see toy_name)
    reference: str = ""
    relation: Relation = "left"

    def check(self, poses: Mapping[str, Pose]) -> TaskResult:
        a, b = self.object(self.subject), self.object(self.reference)
        pa, pb = poses[self.subject], poses[self.reference]
        if math.hypot(pb.pos[0] - b.xy[0], pb.pos[1] - b.xy[1]) > B_MAX_SHIFT:
            return TaskResult(False, f"the {self.reference} was moved")
        if not resting(pb, b.rest_z, 0.02):
            return TaskResult(False, f"the {self.reference} is no longer standing on the table")
        if not resting(pa, a.rest_z, 0.02):
            return TaskResult(False, f"the {self.subject} is not standing on the table")
        ux, uy = DIRECTIONS[self.relation]
        dx, dy = float(pa.pos[0] - pb.pos[0]), float(pa.pos[1] - pb.pos[1])
        along, lateral = dx * ux + dy * uy, abs(-dx * uy + dy * ux)
        min_along = _radius(a) + _radius(b) + MIN_GAP
        if along < min_along * 0.7:
            return TaskResult(False, f"the {self.subject} is not {PHRASES[self.relation]} the {self.reference}")
        if along > MAX_ALONG:
            return TaskResult(False, f"the {self.subject} is too far from the {self.reference}")
        if lateral > LATERAL_RATIO * along:
            return TaskResult(False, f"the {self.subject} is off to the side, not {PHRASES[self.relation]} it")
        return TaskResult(True, f"the {self.subject} is {PHRASES[self.relation]} the {self.reference}")

    def goal_xy(self) -> tuple[float, float]:
        a, b = self.object(self.subject), self.object(self.reference)
        ux, uy = DIRECTIONS[self.relation]
        dist = _radius(a) + _radius(b) + GOAL_CLEARANCE + 0.03
        return (round(b.xy[0] + ux * dist, 4), round(b.xy[1] + uy * dist, 4))

    def oracle_goal(self) -> tuple[str, tuple[float, float]]:
        return self.subject, self.goal_xy()


def _radius(o: ObjectSpec) -> float:
    """Footprint radius along the table, ignoring yaw (a conservative disc)."""
    if o.shape in ("box", "ellipsoid"):
        return min(o.size[0], o.size[1])
    return o.size[0]


def _spec(toy: Toy, xy: tuple[float, float], yaw: float) -> ObjectSpec:
    mass = 0.04 if toy.shape != "sphere" else 0.03
    return ObjectSpec(
        name=toy_name(toy), shape=toy.shape, size=toy.size, rgba=toy.rgba, xy=xy, yaw=yaw, rest_z=toy.rest_z, mass=mass
    )


def make_toy_placement(seed: int, split: str = "train", *, n_distractors: int = 1) -> ToyPlacementTask:
    """A reproducible toy-placement episode. Layouts where A already satisfies the relation, or where
    the goal spot is off the workspace or occupied, are re-drawn, so every task needs doing and can
    be done."""
    split = check_split(split)
    pool = toys(split)
    if not 0 <= n_distractors <= len(pool) - 2:
        raise ValueError(f"n_distractors must be between 0 and {len(pool) - 2}")
    rng = np.random.default_rng([seed, 2, 0 if split == "train" else 1])
    for _ in range(200):
        picks = [pool[i] for i in rng.choice(len(pool), size=2 + n_distractors, replace=False)]
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        xys = sample_layout(rng, [t.footprint_radius for t in picks], gap=0.04)
        specs = tuple(_spec(t, xy, round(float(rng.uniform(-0.5, 0.5)), 4)) for t, xy in zip(picks, xys))
        task = ToyPlacementTask(
            seed=seed,
            split=split,
            instruction=f"Put the {picks[0].name} {PHRASES[relation]} the {picks[1].name}.",
            objects=specs,
            fixtures=(),
            subject=specs[0].name,
            reference=specs[1].name,
            relation=relation,
        )
        if _solvable(task):
            return task
    raise RuntimeError(f"no solvable toy-placement layout for seed {seed}")


def _solvable(task: ToyPlacementTask) -> bool:
    if task.check(task.initial_poses()).success:
        return False
    gx, gy = task.goal_xy()
    if not (WORKSPACE_X[0] <= gx <= WORKSPACE_X[1] and WORKSPACE_Y[0] <= gy <= WORKSPACE_Y[1]):
        return False
    subject = task.object(task.subject)
    goal = {**task.initial_poses(), task.subject: Pose.at(gx, gy, subject.rest_z)}
    if not task.check(goal).success:
        return False
    others = [o for o in task.objects if o.name not in (task.subject, task.reference)]
    return all(math.hypot(gx - o.xy[0], gy - o.xy[1]) > 0.09 for o in others)
