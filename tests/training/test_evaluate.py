"""The eval's judgements that need no server: per-chunk place accuracy and the summary it feeds."""

from __future__ import annotations

from chatvla.client.sim.tasks import make_task
from chatvla.training.evaluate import EpisodeOutcome, place_fraction, summarise
from chatvla.training.labels import judge, override_text, reasoning_for


def test_place_fraction_judges_each_text_against_the_scene_when_it_arrived():
    task = make_task("math_matching", seed=3, split="train")
    poses = task.initial_poses()
    other = next(n for n in task.card_numbers if n != task.answer)
    right = reasoning_for(task, poses)
    elsewhere = override_text(task, other, poses)  # the answer's sum, another card and its place
    assert place_fraction([judge(task, t, poses) for t in (right, right, elsewhere, right)]) == 0.75
    assert place_fraction([]) is None


def test_summary_reports_the_mean_place_fraction_of_the_episodes_that_have_one():
    def outcome(i: int, fraction: float | None) -> EpisodeOutcome:
        return EpisodeOutcome("train", i, "1+2", 3, False, None, 240, "", True, 1.0, 0,
                              reasoning_place_fraction=fraction)

    s = summarise([outcome(0, 1.0), outcome(1, 0.5), outcome(2, None)])["train"]
    assert s["reasoning_place_within_2cm_all_chunks"] == 0.75
    assert "reasoning_place_within_2cm_all_chunks" not in summarise([outcome(0, None)])["train"]
