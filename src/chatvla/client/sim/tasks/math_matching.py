"""Math matching (ChatVLA-2): the whiteboard shows "a+b"; number cards lie on the table; the robot must
put the card showing a+b on the target zone. The instruction does not say the numbers: reading the
board and adding is the reasoning the model has to do."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from chatvla.client.sim.catalog import ALL_NUMBERS, Split, check_split, numbers
from chatvla.client.sim.tasks.base import FixtureSpec, ObjectSpec, Pose, Task, TaskResult, resting, sample_layout

CARD_HALF = (0.03, 0.04, 0.006)  # 60 x 80 x 12 mm: the short side fits both grippers
ZONE_HALF = 0.06
BOARD_XY = (0.30, 0.0)  # beyond the far edge of the workspace, facing the robot
BOARD_HALF = (0.18, 0.11)
FACE_UP_COS = math.cos(math.radians(25))
INSTRUCTION = "Solve the math problem on the whiteboard and put the card with the answer on the green square."


def card_name(number: int) -> str:
    return f"card_{number}"


@dataclass(frozen=True)
class MathMatchingTask(Task):
    kind: ClassVar[str] = "math_matching"
    a: int = 0
    b: int = 0
    zone: str = "target"

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def card_numbers(self) -> tuple[int, ...]:
        return tuple(o.label for o in self.objects if o.label is not None)

    def _zone(self) -> FixtureSpec:
        return next(f for f in self.fixtures if f.name == self.zone)

    def _in_zone(self, pose: Pose) -> bool:
        z = self._zone()
        return abs(pose.pos[0] - z.xy[0]) <= z.half_size[0] and abs(pose.pos[1] - z.xy[1]) <= z.half_size[1]

    def check(self, poses: Mapping[str, Pose]) -> TaskResult:
        target = card_name(self.answer)
        pose = poses[target]
        if not self._in_zone(pose):
            return TaskResult(False, f"{target} is not on the {self.zone} zone")
        if not resting(pose, CARD_HALF[2]):
            return TaskResult(False, f"{target} is over the zone but not lying on the table")
        if pose.rot[2, 2] < FACE_UP_COS:
            return TaskResult(False, f"{target} is on the zone but not face up")
        wrong = [n for n in self.card_numbers if n != self.answer and self._in_zone(poses[card_name(n)])]
        if wrong:
            return TaskResult(False, f"wrong card(s) on the zone too: {wrong}")
        return TaskResult(True, f"{target} ({self.a}+{self.b}) lies on the {self.zone} zone")

    def oracle_goal(self) -> tuple[str, tuple[float, float]]:
        return card_name(self.answer), self._zone().xy


def _operands(rng: np.random.Generator, split: Split) -> tuple[int, int]:
    """a+b for the split: in training every number involved is a training number; held out, the answer
    (the card to pick) is a held-out number and the operands are free."""
    allowed = set(numbers(split))
    operand_ok = allowed if split == "train" else set(ALL_NUMBERS)
    pairs = [(a, n - a) for n in sorted(allowed) for a in range(1, n) if a in operand_ok and n - a in operand_ok]
    return pairs[int(rng.integers(len(pairs)))]


def _distractors(rng: np.random.Generator, split: Split, a: int, b: int, k: int) -> list[int]:
    """Prefer numbers a careless reader would pick (an operand, the answer +-1 or +-10, a+b misread as
    a product), then fill at random from the split's numbers."""
    answer = a + b
    pool = [n for n in numbers(split) if n != answer]
    tempting = sorted({a, b, answer - 1, answer + 1, answer - 10, answer + 10, a * b} & set(pool))
    chosen: list[int] = []
    if tempting and k > 0:
        chosen.append(tempting[int(rng.integers(len(tempting)))])
    rest = [n for n in pool if n not in chosen]
    chosen += [int(n) for n in rng.choice(rest, size=k - len(chosen), replace=False)]
    return chosen


def make_math_matching(seed: int, split: str = "train", *, n_cards: int = 3) -> MathMatchingTask:
    """A reproducible math-matching episode: the same (seed, split, n_cards) always gives the same task."""
    split = check_split(split)
    if not 2 <= n_cards <= 5:
        raise ValueError("n_cards must be between 2 and 5")
    rng = np.random.default_rng([seed, 1, 0 if split == "train" else 1])
    a, b = _operands(rng, split)
    labels = [a + b, *_distractors(rng, split, a, b, n_cards - 1)]
    labels = [labels[i] for i in rng.permutation(len(labels))]
    card_r = math.hypot(CARD_HALF[0], CARD_HALF[1])
    zone_xy, *card_xy = sample_layout(rng, [ZONE_HALF * math.sqrt(2)] + [card_r] * n_cards)
    cards = tuple(
        ObjectSpec(
            name=card_name(n),
            shape="box",
            size=CARD_HALF,
            rgba=(1.0, 1.0, 1.0, 1.0),
            xy=xy,
            yaw=round(float(rng.uniform(-0.35, 0.35)), 4),
            rest_z=CARD_HALF[2],
            label=n,
            mass=0.03,
        )
        for n, xy in zip(labels, card_xy)
    )
    fixtures = (
        FixtureSpec("target", "zone", zone_xy, (ZONE_HALF, ZONE_HALF), rgba=(0.3, 0.75, 0.35, 1.0)),
        FixtureSpec("whiteboard", "whiteboard", BOARD_XY, BOARD_HALF, text=f"{a}+{b}"),
    )
    return MathMatchingTask(seed=seed, split=split, instruction=INSTRUCTION, objects=cards, fixtures=fixtures, a=a, b=b)
