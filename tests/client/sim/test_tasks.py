"""Task generation and success geometry: pure Python, no physics engine involved."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from chatvla.client.sim import catalog
from chatvla.client.sim.tasks import TASK_KINDS, Pose, make_task
from chatvla.client.sim.tasks.math_matching import CARD_HALF, MathMatchingTask, card_name
from chatvla.client.sim.tasks.toy_placement import DIRECTIONS, RELATIONS, ToyPlacementTask

pytestmark = pytest.mark.sim


@pytest.mark.parametrize("kind", TASK_KINDS)
@pytest.mark.parametrize("split", catalog.SPLITS)
def test_same_seed_same_task_and_seeds_differ(kind: str, split: str) -> None:
    assert make_task(kind, 7, split) == make_task(kind, 7, split)
    assert len({repr(make_task(kind, s, split)) for s in range(10)}) == 10


def test_number_splits_are_disjoint_and_cover_the_range() -> None:
    assert not set(catalog.TRAIN_NUMBERS) & set(catalog.HELDOUT_NUMBERS)
    assert set(catalog.TRAIN_NUMBERS) | set(catalog.HELDOUT_NUMBERS) == set(catalog.ALL_NUMBERS)
    assert not {t.name for t in catalog.TRAIN_TOYS} & {t.name for t in catalog.HELDOUT_TOYS}


def test_training_math_never_shows_a_heldout_number() -> None:
    held = set(catalog.HELDOUT_NUMBERS)
    for seed in range(300):
        t = make_task("math_matching", seed, "train")
        assert isinstance(t, MathMatchingTask)
        shown = {t.a, t.b, t.answer, *t.card_numbers}
        assert not shown & held, (seed, shown)
        assert t.answer in t.card_numbers and len(set(t.card_numbers)) == len(t.card_numbers)
        assert next(f for f in t.fixtures if f.kind == "whiteboard").text == f"{t.a}+{t.b}"


def test_heldout_math_cards_are_all_heldout_numbers() -> None:
    answers = set()
    for seed in range(300):
        t = make_task("math_matching", seed, "heldout")
        assert set(t.card_numbers) <= set(catalog.HELDOUT_NUMBERS)
        answers.add(t.answer)
    assert len(answers) >= 5  # the held-out answers are varied, not one number


def test_toy_splits_use_only_their_toys() -> None:
    for split, toys in (("train", catalog.TRAIN_TOYS), ("heldout", catalog.HELDOUT_TOYS)):
        names = {t.name.replace(" ", "_") for t in toys}
        for seed in range(100):
            t = make_task("toy_placement", seed, split)
            assert {o.name for o in t.objects} <= names
            assert t.subject != t.reference


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        make_task("math_matching", 0, "test")
    with pytest.raises(ValueError, match="kind"):
        make_task("stacking", 0)
    with pytest.raises(ValueError):
        make_task("math_matching", 0, n_cards=9)


def _math() -> MathMatchingTask:
    t = make_task("math_matching", 3)
    assert isinstance(t, MathMatchingTask)
    return t


def _zone_xy(t: MathMatchingTask) -> tuple[float, float]:
    return next(f for f in t.fixtures if f.kind == "zone").xy


def test_math_success_needs_the_answer_card_on_the_zone() -> None:
    t = _math()
    zx, zy = _zone_xy(t)
    poses = t.initial_poses()
    assert not t.check(poses).success
    wrong = next(n for n in t.card_numbers if n != t.answer)

    right_placed = {**poses, card_name(t.answer): Pose.at(zx + 0.02, zy - 0.03, CARD_HALF[2], 0.4)}
    result = t.check(right_placed)
    assert result.success, result.reason

    wrong_placed = {**poses, card_name(wrong): Pose.at(zx, zy, CARD_HALF[2])}
    assert not t.check(wrong_placed).success

    both = {**right_placed, card_name(wrong): Pose.at(zx - 0.03, zy + 0.03, CARD_HALF[2])}
    assert "wrong card" in t.check(both).reason

    beside = {**poses, card_name(t.answer): Pose.at(zx + 0.075, zy, CARD_HALF[2])}
    assert not t.check(beside).success


def test_math_card_held_above_or_face_down_does_not_count() -> None:
    t = _math()
    zx, zy = _zone_xy(t)
    poses = t.initial_poses()
    lifted = {**poses, card_name(t.answer): Pose.at(zx, zy, 0.08)}
    assert "not lying" in t.check(lifted).reason
    flipped = Pose(np.array([zx, zy, CARD_HALF[2]]), np.diag([1.0, -1.0, -1.0]))
    assert "face up" in t.check({**poses, card_name(t.answer): flipped}).reason


def _toy(relation: str) -> ToyPlacementTask:
    for seed in range(200):
        t = make_task("toy_placement", seed)
        assert isinstance(t, ToyPlacementTask)
        if t.relation == relation:
            return t
    raise AssertionError(f"no {relation} task in 200 seeds")


@pytest.mark.parametrize("relation", RELATIONS)
def test_toy_success_follows_the_named_direction(relation: str) -> None:
    t = _toy(relation)
    a, b = t.object(t.subject), t.object(t.reference)
    poses = t.initial_poses()
    assert not t.check(poses).success
    gx, gy = t.goal_xy()
    assert t.check({**poses, t.subject: Pose.at(gx, gy, a.rest_z)}).success
    ux, uy = DIRECTIONS[relation]
    opposite = (b.xy[0] - ux * 0.09, b.xy[1] - uy * 0.09)
    assert not t.check({**poses, t.subject: Pose.at(*opposite, a.rest_z)}).success
    sideways = (b.xy[0] + uy * 0.09 + ux * 0.02, b.xy[1] + ux * 0.09 + uy * 0.02)
    assert not t.check({**poses, t.subject: Pose.at(*sideways, a.rest_z)}).success
    far = (b.xy[0] + ux * 0.3, b.xy[1] + uy * 0.3)
    assert "too far" in t.check({**poses, t.subject: Pose.at(*far, a.rest_z)}).reason
    in_air = {**poses, t.subject: Pose.at(gx, gy, a.rest_z + 0.1)}
    assert not t.check(in_air).success
    b_moved = {**poses, t.subject: Pose.at(gx, gy, a.rest_z), t.reference: Pose.at(b.xy[0] + 0.1, b.xy[1], b.rest_z)}
    assert "moved" in t.check(b_moved).reason


def test_instructions_name_what_to_do() -> None:
    t = _toy("left")
    assert t.instruction.startswith("Put the ") and "to the left of" in t.instruction
    assert t.subject.replace("_", " ") in t.instruction and t.reference.replace("_", " ") in t.instruction
    m = _math()
    assert "whiteboard" in m.instruction and str(m.answer) not in m.instruction


def test_tasks_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        _math().a = 1  # type: ignore[misc]


def test_card_and_board_textures_are_deterministic() -> None:
    from chatvla.client.sim import labels

    face = labels.card_face(21)
    assert face.shape == (64, 48, 3) and face.dtype == np.uint8
    assert np.array_equal(face, labels.card_face(21))
    assert not np.array_equal(face, labels.card_face(12))
    assert (face < 100).any()  # there is ink
