"""What the model is taught to say, and how what it said is judged. Torch-free.

The reasoning text follows the paper's math-matching example ("24+12=36. Pick card 36."): the sum read
off the whiteboard, then the card the arm is going to pick. The instruction never states the numbers,
so the only way to write this text is to read the board from pixels.

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


def pick_text(card: int) -> str:
    return f"Pick card {card}."


def reasoning_for(task: Task) -> str:
    """The reasoning a correct model writes for `task` (without the end marker)."""
    if isinstance(task, MathMatchingTask):
        return f"{task.a}+{task.b}={task.answer}. {pick_text(task.answer)}"
    if isinstance(task, ToyPlacementTask):
        subject = task.subject.replace("_", " ")
        reference = task.reference.replace("_", " ")
        return f"Put the {subject} {PHRASES[task.relation]} the {reference}."
    raise ValueError(f"no reasoning label for task kind {type(task).__name__}")


def override_text(task: MathMatchingTask, card: int) -> str:
    """A reasoning that names another card: the board is read right, the pick is `card`."""
    return f"{task.a}+{task.b}={task.answer}. {pick_text(card)}"


@dataclass(frozen=True)
class ReasoningJudgement:
    """Did a math-matching reasoning state the right sum and the right card?"""

    sum_ok: bool
    card_ok: bool
    stated_sum: int | None
    stated_card: int | None

    @property
    def correct(self) -> bool:
        return self.sum_ok and self.card_ok


_SUM = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)")
_CARD = re.compile(r"[Pp]ick card (\d+)")


def judge_reasoning(task: MathMatchingTask, text: str) -> ReasoningJudgement:
    """Parse "a+b=s. Pick card n." leniently (spaces, case) and compare with the task."""
    m = _SUM.search(text)
    c = _CARD.search(text)
    stated_sum = int(m.group(3)) if m else None
    sum_ok = bool(m) and (int(m.group(1)), int(m.group(2)), stated_sum) == (task.a, task.b, task.answer)
    stated_card = int(c.group(1)) if c else None
    return ReasoningJudgement(sum_ok, stated_card == task.answer, stated_sum, stated_card)


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
        (f"Where is card {n}?", f"Card {n} is {_side(poses[card_name(n)])}."),
        ("Which card shows the answer to the problem on the whiteboard?", f"Card {task.answer}."),
    ]
    if other:
        m = int(other[int(rng.integers(len(other)))])
        left = n if poses[card_name(n)].pos[1] > poses[card_name(m)].pos[1] else m
        candidates.append((f"Which is further left, card {n} or card {m}?", f"Card {left}."))
    idx = rng.permutation(len(candidates))[:k]
    return [candidates[i] for i in idx]
