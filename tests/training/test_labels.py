"""What the model is taught to say, and how its words are judged."""

from __future__ import annotations

import re

import numpy as np
import pytest

from chatvla.client.sim.catalog import HELDOUT_NUMBERS
from chatvla.client.sim.tasks import make_task
from chatvla.training.labels import (
    answer_place,
    image_text_pairs,
    judge_reasoning,
    override_text,
    place_error_cm,
    reasoning_for,
    where_is_card,
)


def test_reasoning_states_the_sum_the_card_and_the_places():
    task = make_task("math_matching", seed=3, split="train")
    poses = task.initial_poses()
    card = poses[f"card_{task.answer}"].pos
    zone = task.fixtures[0].xy
    def even_cm(v: float) -> int:
        return 2 * round(50 * float(v))

    assert reasoning_for(task) == (
        f"{task.a}+{task.b}={task.answer}. Pick card {task.answer} at ({even_cm(card[0])}, "
        f"{even_cm(card[1])}), place at ({even_cm(zone[0])}, {even_cm(zone[1])}).")


def test_judge_checks_the_stated_place_within_two_centimetres():
    task = make_task("math_matching", seed=3, split="train")
    poses = task.initial_poses()
    assert judge_reasoning(task, reasoning_for(task), poses).place_ok
    moved = {k: v for k, v in poses.items()}
    p = poses[f"card_{task.answer}"]
    moved[f"card_{task.answer}"] = type(p)(p.pos + np.array([0.05, 0.0, 0.0]), p.rot)
    assert judge_reasoning(task, reasoning_for(task), moved).place_ok is False
    assert judge_reasoning(task, reasoning_for(task)).place_ok is None


def test_judge_accepts_the_label_and_spacing_and_refuses_wrong_sum_or_card():
    task = make_task("math_matching", seed=3, split="train")
    assert judge_reasoning(task, reasoning_for(task)).correct
    assert judge_reasoning(task, f"{task.a} + {task.b} = {task.answer}. pick card {task.answer}").correct
    assert judge_reasoning(task, f"{task.a}+{task.b}={task.answer}. Pick card {task.answer}.").correct
    wrong_sum = judge_reasoning(task, f"{task.a}+{task.b}={task.answer + 1}. Pick card {task.answer}.")
    assert not wrong_sum.sum_ok and wrong_sum.card_ok and not wrong_sum.correct
    other = next(n for n in task.card_numbers if n != task.answer)
    wrong_card = judge_reasoning(task, override_text(task, other))
    assert wrong_card.sum_ok and not wrong_card.card_ok
    assert not judge_reasoning(task, "Nextn placeon DGges").correct


def test_training_texts_never_name_a_held_out_number():
    """Neither reasoning labels (with places) nor image-text answers contain a held-out number."""
    rng = np.random.default_rng(0)
    for seed in range(60):
        task = make_task("math_matching", seed=seed, split="train")
        texts = [*image_text_pairs(task, task.initial_poses(), rng, k=6), ("", reasoning_for(task))]
        for q, a in texts:
            numbers = {int(x) for x in __import__("re").findall(r"\d+", q + " " + a)}
            assert not numbers & set(HELDOUT_NUMBERS), (q, a)


def test_where_is_card_answers_from_the_pose():
    task = make_task("math_matching", seed=5, split="train")
    poses = task.initial_poses()
    rng = np.random.default_rng(1)
    pairs = dict(p for _ in range(30) for p in image_text_pairs(task, poses, rng, k=6))
    where = {q: a for q, a in pairs.items() if q.startswith("Where is card")}
    assert where
    for q, a in where.items():
        n = int(q.split()[-1].rstrip("?"))
        pos = poses[f"card_{n}"].pos
        assert ("left" in a) == (pos[1] > 0) and ("near" in a) == (pos[0] < 0)


def test_a_where_answer_is_read_back_to_the_place_it_states_within_the_rounding():
    """The localisation benchmark asks each card's place and reads the answer back with these."""
    task = make_task("math_matching", seed=5, split="train")
    poses = task.initial_poses()
    rng = np.random.default_rng(1)
    pairs = dict(p for _ in range(30) for p in image_text_pairs(task, poses, rng, k=6))
    asked = [n for n in task.card_numbers if where_is_card(n) in pairs]
    assert asked
    for n in asked:
        answer = pairs[where_is_card(n)]
        stated = answer_place(answer)
        assert stated is not None and all(v % 2 == 0 for v in stated)
        assert place_error_cm(stated, poses[f"card_{n}"]) <= 1.0  # rounded to even centimetres
        assert place_error_cm((stated[0] + 6, stated[1]), poses[f"card_{n}"]) >= 5.0
    assert answer_place("Card 3 is on the far left.") is None


@pytest.mark.parametrize("kind", ["toy_placement"])
def test_toy_placement_reasoning_names_both_toys_and_the_relation(kind):
    task = make_task(kind, seed=2, split="train")
    text = reasoning_for(task)
    assert task.subject.replace("_", " ") in text and task.reference.replace("_", " ") in text


def test_place_targets_are_where_the_text_says_and_fold_the_card_yaw():
    from chatvla.client.sim.tasks.base import Pose
    from chatvla.training.labels import cm, place_targets, stated_places

    task = make_task("math_matching", seed=5, split="train")
    poses = task.initial_poses()
    t = place_targets(task, poses)
    text = reasoning_for(task, poses)
    assert f"at ({cm(t[0])}, {cm(t[1])}), place at ({cm(t[3])}, {cm(t[4])})" in text
    x, y, sx, sy = (round(float(v) * 100) for v in stated_places(t))
    assert f"at ({x}, {y}), place at ({sx}, {sy})" in text
    card = poses[f"card_{task.answer}"]
    c, s = np.cos(np.pi - 0.1), np.sin(np.pi - 0.1)  # turned by pi - 0.1 looks like turned by -0.1
    turned = {**poses, f"card_{task.answer}": Pose(card.pos, np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]))}
    assert place_targets(task, turned)[2] == pytest.approx(-0.1, abs=1e-5)


def test_card_token_labels_name_the_token_that_holds_each_card_and_ignore_the_ring_around_it():
    """An 8x8 token grid over a 224x224 image (28 px per token)."""
    from chatvla.training.labels import IGNORE, NO_CARD, card_token_labels

    labels = card_token_labels({36: (100.0, 60.0), 14: (210.0, 215.0)}, (224, 224), (8, 8))
    assert labels.shape == (8, 8) and labels.dtype == np.int64
    assert labels[2, 3] == 36 and labels[7, 7] == 14  # row 60 // 28 = 2, column 100 // 28 = 3
    assert (labels[1:4, 2:5] == IGNORE).sum() == 8  # the ring around card 36
    assert labels[6, 6] == IGNORE and labels[5, 5] == NO_CARD and labels[0, 0] == NO_CARD
    assert (labels > 0).sum() == 2
    shared = card_token_labels({36: (100.0, 60.0), 12: (110.0, 70.0)}, (224, 224), (8, 8))
    assert shared[2, 3] == IGNORE and (shared > 0).sum() == 0  # two cards' centres in one token: no label
    outside = card_token_labels({36: (-3.0, 60.0), 12: (float("nan"), 10.0)}, (224, 224), (8, 8))
    assert (outside == NO_CARD).all()
    finer = card_token_labels({36: (100.0, 60.0)}, (224, 224), (12, 12))  # the same image read at 336x336
    assert finer[3, 5] == 36  # row 60 * 12 // 224 = 3, column 100 * 12 // 224 = 5


def test_text_only_sums_add_right_and_never_name_a_held_out_number():
    from chatvla.training.labels import ARITHMETIC_MAX, arithmetic_pair

    rng = np.random.default_rng(0)
    pairs = [arithmetic_pair(rng) for _ in range(2000)]
    sums = set()
    for q, a in pairs:
        x, y, s = (int(v) for v in re.findall(r"\d+", a))
        assert q == f"What is {x}+{y}?" and x + y == s and max(x, y) <= ARITHMETIC_MAX, (q, a)
        assert not {x, y, s} & set(HELDOUT_NUMBERS), (q, a)
        sums.add(s)
    # every units digit comes with many tens digits: not a table of the boards' sums
    assert all(len({s // 10 for s in sums if s % 10 == d}) >= 10 for d in range(10))


def test_wider_text_only_sums_keep_half_to_the_boards_range_and_still_name_no_held_out_number():
    """--arithmetic-max 999: half the sums as before (operands up to 99), half with operands up to 999,
    which write every digit after every prefix ("=29" now starts 290-299); held-out numbers still
    appear nowhere, and the default draws the same sums as before the option existed."""
    from chatvla.training.labels import ARITHMETIC_MAX, arithmetic_pair

    rng, old = np.random.default_rng(3), np.random.default_rng(3)  # the default draws no extra number
    for _ in range(20):
        while not {*(pair := [int(v) for v in old.integers(1, ARITHMETIC_MAX + 1, size=2)]), sum(pair)}.isdisjoint(
                HELDOUT_NUMBERS):
            pass
        assert arithmetic_pair(rng)[1] == f"{pair[0]}+{pair[1]}={sum(pair)}."
    rng = np.random.default_rng(0)
    wide = 0
    for q, a in (arithmetic_pair(rng, 999) for _ in range(2000)):
        x, y, s = (int(v) for v in re.findall(r"\d+", a))
        assert q == f"What is {x}+{y}?" and x + y == s and max(x, y) <= 999, (q, a)
        assert not {x, y, s} & set(HELDOUT_NUMBERS), (q, a)
        wide += max(x, y) > ARITHMETIC_MAX
    assert 900 <= wide <= 1100, wide  # half the draws take operands up to 999; few of those stay <= 99
    narrow = [re.findall(r"\d+", arithmetic_pair(rng, 20)[1]) for _ in range(200)]
    assert max(max(int(x), int(y)) for x, y, _ in narrow) <= 20  # below 99 the bound holds as well
