"""What the model is taught to say, and how what it said is judged. Torch-free.

The reasoning text follows the paper's math-matching example ("24+12=36. Pick card 36.") and adds the
spatial statement the paper's reasoning makes for placement: where that card and the green square are
now, in centimetres in the task frame (x away from the robot, y to its left):
"24+12=36. Pick card 36 at (5, -12), place at (-3, 10)." The instruction never states
the numbers or the places, so the only way to write this text is to read the scene from pixels; and
the action expert, conditioned on this text, learns to go where it says (reasoning-following).

Image-text questions are the stage-1 "understanding" data: reading the board, reading the cards,
saying where a card lies. They are generated from the same scenes as the episodes and only from
training-split tasks, so held-out numbers appear nowhere in training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from chatvla.client.sim.tasks.base import Pose, Task
from chatvla.client.sim.tasks.math_matching import MathMatchingTask, card_name
from chatvla.client.sim.tasks.toy_placement import PHRASES, ToyPlacementTask

END_MARKER = "Next action:"  # the authors' end of reasoning (DexVLA / ChatVLA-2)


def cm(v: float) -> int:
    """Metres -> centimetres rounded to an even number (no "-0"). Even, because every held-out number is
    odd (catalog: n % 6 == 5): a place can then never spell a held-out number, which must appear nowhere
    in training. 2 cm steps are finer than the gripper's slack around a 6 cm card."""
    return 2 * round(float(50 * v)) or 0  # float(): a numpy float would round to a float


def place(pose: Pose) -> str:
    return f"({cm(pose.pos[0])}, {cm(pose.pos[1])})"


def pick_text(task: MathMatchingTask, card: int, poses: dict[str, Pose] | None = None) -> str:
    """"Pick card N at (x, y), place at (x, y)." (the card's and the green square's current places)."""
    poses = poses or task.initial_poses()
    zone = next(f for f in task.fixtures if f.name == task.zone)
    square = f"({cm(zone.xy[0])}, {cm(zone.xy[1])})"
    return f"Pick card {card} at {place(poses[card_name(card)])}, place at {square}."


PLACE_TARGETS = ("card_x", "card_y", "card_yaw", "square_x", "square_y")


def place_targets(task: MathMatchingTask, poses: dict[str, Pose]) -> np.ndarray:
    """Where the answer card and the green square are (task frame, metres; the card's yaw in radians,
    folded into (-pi/2, pi/2] since a card looks the same turned by pi): the training-only read-out
    targets of `chatvla.training.stages.PlaceProbe`, in `PLACE_TARGETS` order."""
    pose = poses[card_name(task.answer)]
    yaw = float(np.arctan2(pose.rot[1, 0], pose.rot[0, 0]))
    yaw = (yaw + np.pi / 2) % np.pi - np.pi / 2
    zone = next(f for f in task.fixtures if f.name == task.zone)
    return np.array([pose.pos[0], pose.pos[1], yaw, zone.xy[0], zone.xy[1]], np.float32)


def stated_places(targets: np.ndarray) -> np.ndarray:
    """The places of `place_targets` as the reasoning text writes them (card x, y, square x, y, rounded
    by `cm`), in metres: what the text lets a reader recover."""
    return np.array([cm(v) / 100 for v in np.asarray(targets)[[0, 1, 3, 4]]], np.float32)


def reasoning_for(task: Task, poses: dict[str, Pose] | None = None) -> str:
    """The reasoning a correct model writes for `task` with its objects at `poses` (task frame; default:
    where they start), without the end marker."""
    if isinstance(task, MathMatchingTask):
        return f"{task.a}+{task.b}={task.answer}. {pick_text(task, task.answer, poses)}"
    if isinstance(task, ToyPlacementTask):
        subject = task.subject.replace("_", " ")
        reference = task.reference.replace("_", " ")
        return f"Put the {subject} {PHRASES[task.relation]} the {reference}."
    raise ValueError(f"no reasoning label for task kind {type(task).__name__}")


def override_text(task: MathMatchingTask, card: int, poses: dict[str, Pose] | None = None) -> str:
    """A reasoning that names another card (with its place): the board is read right, the pick is `card`."""
    return f"{task.a}+{task.b}={task.answer}. {pick_text(task, card, poses)}"


@dataclass(frozen=True)
class ReasoningJudgement:
    """Did a math-matching reasoning state the right sum and the right card (and, when the scene's poses
    are given, the card's place within `PLACE_TOL_CM`)?"""

    sum_ok: bool
    card_ok: bool
    stated_sum: int | None
    stated_card: int | None
    place_ok: bool | None = None

    @property
    def correct(self) -> bool:
        return self.sum_ok and self.card_ok


_SUM = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)")
_CARD = re.compile(r"[Pp]ick card (\d+)(?: at \((-?\d+), (-?\d+)\))?")
PLACE_TOL_CM = 2


def stated_place_error_cm(text: str, poses: dict[str, Pose]) -> float | None:
    """How far (cm, the larger of the x and y errors) the place the text states for the card it picks
    is from where that card lies; None when the text states no place or picks no card in `poses`."""
    c = _CARD.search(text)
    if not c or c.group(2) is None or card_name(int(c.group(1))) not in poses:
        return None
    pos = poses[card_name(int(c.group(1)))].pos
    return float(max(abs(int(c.group(2)) - 100 * pos[0]), abs(int(c.group(3)) - 100 * pos[1])))


def judge_reasoning(task: MathMatchingTask, text: str, poses: dict[str, Pose] | None = None) -> ReasoningJudgement:
    """Parse "a+b=s. Pick card n at (x, y)..." leniently (spaces, case) and compare with the task."""
    m = _SUM.search(text)
    c = _CARD.search(text)
    stated_sum = int(m.group(3)) if m else None
    sum_ok = bool(m) and (int(m.group(1)), int(m.group(2)), stated_sum) == (task.a, task.b, task.answer)
    stated_card = int(c.group(1)) if c else None
    place_ok = None
    if poses is not None:
        err = stated_place_error_cm(text, poses) if stated_card == task.answer else None
        place_ok = err is not None and err <= PLACE_TOL_CM
    return ReasoningJudgement(sum_ok, stated_card == task.answer, stated_sum, stated_card, place_ok)


# --- image-text questions (stage 1) ---------------------------------------------------------------------
def _side(pose: Pose) -> str:
    """Robot's view: +y is left, -x is near the robot."""
    lr = "left" if pose.pos[1] > 0 else "right"
    nf = "near" if pose.pos[0] < 0 else "far"
    return f"on the {nf} {lr}"


def image_text_pairs(task: MathMatchingTask, poses: dict[str, Pose], rng: np.random.Generator, k: int = 2
                     ) -> list[tuple[str, str]]:
    """`k` (question, answer) pairs about a math-matching scene at rest; `poses` in the task frame."""
    cards = sorted(task.card_numbers, key=lambda n: -float(poses[card_name(n)].pos[1]))  # left to right
    n = int(cards[int(rng.integers(len(cards)))])
    other = [c for c in cards if c != n]
    candidates = [
        ("What is written on the whiteboard?", f"{task.a}+{task.b}"),
        ("Solve the math problem on the whiteboard.", f"{task.a}+{task.b}={task.answer}"),
        ("Read the cards on the table from left to right.", ", ".join(str(c) for c in cards)),
        (f"Where is card {n}?", f"Card {n} is {_side(poses[card_name(n)])}, at {place(poses[card_name(n)])}."),
        ("Where is the green square?", "At ({}, {}).".format(*(cm(v) for v in next(
            f for f in task.fixtures if f.name == task.zone).xy))),
        ("Which card shows the answer to the problem on the whiteboard?", f"Card {task.answer}."),
    ]
    if other:
        m = int(other[int(rng.integers(len(other)))])
        left = n if poses[card_name(n)].pos[1] > poses[card_name(m)].pos[1] else m
        candidates.append((f"Which is further left, card {n} or card {m}?", f"Card {left}."))
    idx = rng.permutation(len(candidates))[:k]
    return [candidates[i] for i in idx]
