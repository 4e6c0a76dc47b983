"""What the model is taught to say, and how what it said is judged. Torch-free.

The reasoning text follows the paper's math-matching example ("24+12=36. Pick card 36.") and adds the
spatial statement the paper's reasoning makes for placement: where that card and the green square are
now, in centimetres in the task frame (x away from the robot, y to its left):
"24+12=36. Pick card 36 at (5, -12), place at (-3, 10)." The instruction never states
the numbers or the places, so the only way to write this text is to read the scene from pixels; and
the action expert, conditioned on this text, learns to go where it says (reasoning-following).

Toy placement gets the same treatment: the instruction names the two toys and the relation, the
reasoning adds what only the pixels tell: where the subject is now and where it goes, which is where
the reference is plus the relation's offset ("Put red cube (4, -10) left of blue ball: place at
(2, 16).").

Image-text questions are the stage-1 "understanding" data: reading the board, reading the cards,
saying where a card lies; for toys, naming the toys on the table, saying where one lies, which of
two is further left or nearer the robot, and where the subject has to go. They are generated from
the same scenes as the episodes and only from training-split tasks, so held-out numbers and toys
appear nowhere in training.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from chatvla.client.sim.catalog import HELDOUT_NUMBERS
from chatvla.client.sim.tasks.base import Pose, Task
from chatvla.client.sim.tasks.math_matching import MathMatchingTask, card_name
from chatvla.client.sim.tasks.toy_placement import PHRASES, RELATIONS, Relation, ToyPlacementTask

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
        return toy_text(task, task.relation, poses)
    raise ValueError(f"no reasoning label for task kind {type(task).__name__}")


def spoken(name: str) -> str:
    """An object name as the text says it ("red_cube" -> "red cube")."""
    return name.replace("_", " ")


def toy_goal(task: ToyPlacementTask, relation: Relation, poses: dict[str, Pose]) -> tuple[float, float]:
    """Where the subject goes to be `relation` of the reference where the reference is *now* (task
    frame, metres): the oracle's aim (`goal_xy`, a fixed clearance beyond both footprints) moved with
    the reference, so a per-tick label stays true if the reference is nudged."""
    gx, gy = task.goal_xy() if relation == task.relation else _replace_relation(task, relation).goal_xy()
    ref = task.object(task.reference)
    pos = poses[task.reference].pos
    return (float(pos[0]) + gx - ref.xy[0], float(pos[1]) + gy - ref.xy[1])


def _replace_relation(task: ToyPlacementTask, relation: Relation) -> ToyPlacementTask:
    from dataclasses import replace

    return replace(task, relation=relation)


RELATION_WORDS: dict[Relation, str] = {"left": "left of", "right": "right of", "front": "in front of",
                                       "behind": "behind"}  # the task's phrases without "to the": fewer tokens


def toy_text(task: ToyPlacementTask, relation: Relation, poses: dict[str, Pose] | None = None) -> str:
    """"Put red cube (4, -10) left of blue ball: place at (2, 16)." with the subject's current place
    and its destination (which carries the reference's place). At most 45 tokens of the tiny tokenizer
    with the end marker, inside tiny-sim's 48: the toy names cost up to 7 tokens each and every place
    about 7, so the reference's own place is left out."""
    poses = poses or task.initial_poses()
    gx, gy = toy_goal(task, relation, poses)
    return (f"Put {spoken(task.subject)} {place(poses[task.subject])} {RELATION_WORDS[relation]} "
            f"{spoken(task.reference)}: place at ({cm(gx)}, {cm(gy)}).")


def override_relation(task: ToyPlacementTask) -> Relation | None:
    """The relation a toy override names: another relation whose spot is on the workspace, free, and
    not already satisfied (deterministic from the seed); None when no other relation fits."""
    from chatvla.client.sim.tasks.toy_placement import _solvable

    others = [r for r in RELATIONS if r != task.relation]
    k = task.seed % len(others)
    for r in others[k:] + others[:k]:
        if _solvable(_replace_relation(task, r)):
            return r
    return None


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


_AT = re.compile(r"at \((-?\d+), (-?\d+)\)")


def where_is_card(n: int) -> str:
    """The image-text question about a card's place (its answer: "Card N is on the far left, at (x, y).")."""
    return f"Where is card {n}?"


def answer_place(text: str) -> tuple[int, int] | None:
    """The first place (x, y in cm) an answer states, as `place` writes it; None when it states none."""
    m = _AT.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def place_error_cm(stated: tuple[int, int], pose: Pose) -> float:
    """The larger of the x and y errors (cm) of a stated place against where the object lies."""
    return float(max(abs(stated[0] - 100 * pose.pos[0]), abs(stated[1] - 100 * pose.pos[1])))


def stated_place_error_cm(text: str, poses: dict[str, Pose]) -> float | None:
    """How far (cm, the larger of the x and y errors) the place the text states for the card it picks
    is from where that card lies; None when the text states no place or picks no card in `poses`."""
    c = _CARD.search(text)
    if not c or c.group(2) is None or card_name(int(c.group(1))) not in poses:
        return None
    return place_error_cm((int(c.group(2)), int(c.group(3))), poses[card_name(int(c.group(1)))])


def stated_sum(text: str) -> tuple[int, int, int] | None:
    """The first "a+b=s" a text states, as (a, b, s), spaces allowed; None when it states none."""
    m = _SUM.search(text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def judge_reasoning(task: MathMatchingTask, text: str, poses: dict[str, Pose] | None = None) -> ReasoningJudgement:
    """Parse "a+b=s. Pick card n at (x, y)..." leniently (spaces, case) and compare with the task."""
    stated = stated_sum(text)
    c = _CARD.search(text)
    sum_ok = stated == (task.a, task.b, task.answer)
    stated_card = int(c.group(1)) if c else None
    place_ok = None
    if poses is not None:
        err = stated_place_error_cm(text, poses) if stated_card == task.answer else None
        place_ok = err is not None and err <= PLACE_TOL_CM
    return ReasoningJudgement(sum_ok, stated_card == task.answer, stated[2] if stated else None, stated_card,
                              place_ok)


@dataclass(frozen=True)
class ToyJudgement:
    """Did a toy-placement reasoning name the right subject, relation and reference (and, when the
    scene's poses are given, state the subject's place and its destination within `PLACE_TOL_CM`)?"""

    subject_ok: bool
    relation_ok: bool
    reference_ok: bool
    stated_relation: str | None
    place_ok: bool | None = None

    @property
    def correct(self) -> bool:
        return self.subject_ok and self.relation_ok and self.reference_ok


_TOY = re.compile(r"[Pp]ut (?:the )?([a-z ]+?)(?: at)? ?(?:\((-?\d+), (-?\d+)\))? ?"
                  r"((?:to the )?left of|(?:to the )?right of|in front of|behind) (?:the )?([a-z ]+?)\s*(?:[:.,]|$)")
_DEST = re.compile(r"place (?:it )?at \((-?\d+), (-?\d+)\)")


def _relation_of(phrase: str) -> Relation:
    return next(r for r, w in RELATION_WORDS.items() if phrase.endswith(w))


def judge_toy_reasoning(task: ToyPlacementTask, text: str, poses: dict[str, Pose] | None = None) -> ToyJudgement:
    """Parse "Put A (x, y) left of B: place at (x, y)." leniently (case, "the", the task's longer
    phrases) and compare with the task. With `poses`, the subject's stated place and the destination
    must both be stated and within `PLACE_TOL_CM` of the subject's place and of `toy_goal` for the
    relation the text names."""
    m = _TOY.search(text.strip().lower())
    if not m:
        return ToyJudgement(False, False, False, None, None if poses is None else False)
    subject, sx, sy, reference = m.group(1), m.group(2), m.group(3), m.group(5)
    relation = _relation_of(m.group(4))
    place_ok = None
    d = _DEST.search(text.lower())
    if poses is not None:
        place_ok = False
        if sx is not None and d is not None and task.subject in poses:
            pos = poses[task.subject].pos
            gx, gy = toy_goal(task, relation, poses)
            err = max(abs(int(sx) - 100 * pos[0]), abs(int(sy) - 100 * pos[1]),
                      abs(int(d.group(1)) - 100 * gx), abs(int(d.group(2)) - 100 * gy))
            place_ok = bool(err <= PLACE_TOL_CM)
    return ToyJudgement(subject == spoken(task.subject), relation == task.relation,
                        reference == spoken(task.reference), relation, place_ok)


def judge(task: Task, text: str, poses: dict[str, Pose] | None = None) -> ReasoningJudgement | ToyJudgement:
    """The judge for the task's kind."""
    if isinstance(task, MathMatchingTask):
        return judge_reasoning(task, text, poses)
    if isinstance(task, ToyPlacementTask):
        return judge_toy_reasoning(task, text, poses)
    raise ValueError(f"no judge for task kind {type(task).__name__}")


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
        (where_is_card(n), f"Card {n} is {_side(poses[card_name(n)])}, at {place(poses[card_name(n)])}."),
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


def toy_pairs(task: ToyPlacementTask, poses: dict[str, Pose], rng: np.random.Generator, k: int = 2
              ) -> list[tuple[str, str]]:
    """`k` (question, answer) pairs about a toy scene at rest; `poses` in the task frame. Every toy is
    one of the task's own, so a training-split task names training toys only."""
    names = sorted((o.name for o in task.objects), key=lambda n: -float(poses[n].pos[1]))  # left to right
    n = names[int(rng.integers(len(names)))]
    candidates = [
        ("Which toys are on the table, from left to right?", ", ".join(spoken(x) for x in names) + "."),
        (f"Where is the {spoken(n)}?", f"The {spoken(n)} is {_side(poses[n])}, at {place(poses[n])}."),
        (f"Where does the {spoken(task.subject)} go to be {PHRASES[task.relation]} the {spoken(task.reference)}?",
         "At ({}, {}).".format(*(cm(v) for v in toy_goal(task, task.relation, poses)))),
    ]
    other = [x for x in names if x != n]
    if other:
        m = other[int(rng.integers(len(other)))]
        left = n if poses[n].pos[1] > poses[m].pos[1] else m
        near = n if poses[n].pos[0] < poses[m].pos[0] else m
        candidates.append((f"Which is further left, the {spoken(n)} or the {spoken(m)}?", f"The {spoken(left)}."))
        candidates.append((f"Which is nearer the robot, the {spoken(n)} or the {spoken(m)}?", f"The {spoken(near)}."))
    idx = rng.permutation(len(candidates))[:k]
    return [candidates[i] for i in idx]


def scene_pairs(task: Task, poses: dict[str, Pose], rng: np.random.Generator, k: int = 2) -> list[tuple[str, str]]:
    """The image-text pairs for the task's kind (math matching: `image_text_pairs`, unchanged)."""
    if isinstance(task, MathMatchingTask):
        return image_text_pairs(task, poses, rng, k)
    if isinstance(task, ToyPlacementTask):
        return toy_pairs(task, poses, rng, k)
    raise ValueError(f"no image-text pairs for task kind {type(task).__name__}")


# --- sums in words only (stage 1's arithmetic co-training) -----------------------------------------------
ARITHMETIC_MAX = 99  # operands of the text-only sums: up to the boards' two digits, so sums reach 198


def arithmetic_pair(rng: np.random.Generator, max_operand: int = ARITHMETIC_MAX) -> tuple[str, str]:
    """A text-only sum ("What is 68+73?", "68+73=141."), with neither operand nor sum a held-out number.

    The robot data and the scenes show only sums of training numbers up to 49, so a model trained on
    them alone learns those sums as a table and, for a held-out answer, writes its nearest neighbour
    ("18+23=40."): the digit after "=4" is never 1 or 7 in training. The paper's VLM brings arithmetic
    from pretraining; this is the tiny model's stand-in. Over every operand up to 99 the sums are too
    many to learn as a table and the same units digits come with every tens digit ("18+33=51",
    "68+73=141"), so what there is to learn is how to add, digit by digit.

    With `max_operand` above 99, half the sums keep to operands up to 99 (the boards' two digits) and
    half take operands up to `max_operand`. Under 100 the held-out sums are the only two-digit answers
    never written ("=29." never follows "=2"), so 10,000 sums still leave a table a small model can
    learn, gaps and all; three-digit sums are too many to learn as a table and write every digit after
    every digit, so what they teach is the carry and the units digit as such."""
    held = set(HELDOUT_NUMBERS)
    while True:
        hi = max_operand  # up to 99 (the default) no extra draw, so the default's sums stay as they were
        if max_operand > ARITHMETIC_MAX and rng.random() >= 0.5:
            hi = ARITHMETIC_MAX
        a, b = (int(x) for x in rng.integers(1, hi + 1, size=2))
        if not {a, b, a + b} & held:
            return arithmetic_question(a, b), f"{a}+{b}={a + b}."


def arithmetic_question(a: int, b: int) -> str:
    """The text-only question `arithmetic_pair` asks (and `benchmarks/arithmetic.py` asks of held-out sums)."""
    return f"What is {a}+{b}?"


# --- which vision token shows which card (stage 1's card-token loss) ----------------------------------
NO_CARD, IGNORE = 0, -100


def card_token_labels(pixels: Mapping[int, tuple[float, float]], image_hw: tuple[int, int],
                      grid: tuple[int, int]) -> np.ndarray:
    """[rows, cols] labels of one camera's merged vision tokens: the card's number on the token that
    holds its centre (`pixels`: number -> (column, row) in an image of `image_hw`), `NO_CARD` on tokens
    two or more tokens away from every card, `IGNORE` on the ring around a card (its label may spill
    into a neighbour) and where two cards' centres share a token. Cards outside the image are left out."""
    (h, w), (rows, cols) = image_hw, grid
    out = np.full((rows, cols), NO_CARD, np.int64)
    cells: dict[tuple[int, int], list[int]] = {}
    for n, (col, row) in pixels.items():
        if 0 <= col < w and 0 <= row < h:
            cells.setdefault((int(row * rows // h), int(col * cols // w)), []).append(int(n))
    for r, c in cells:
        out[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = IGNORE
    for (r, c), numbers in cells.items():
        out[r, c] = numbers[0] if len(numbers) == 1 else IGNORE
    return out
