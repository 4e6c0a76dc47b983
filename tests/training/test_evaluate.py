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


def test_summary_counts_the_episodes_whose_requests_failed():
    """A refused observation holds the arm (a stall that latency did not cause): the summary says in how
    many episodes that happened, so stall ticks are not read as a slow server."""
    def outcome(i: int, failed: int) -> EpisodeOutcome:
        return EpisodeOutcome("train", i, "1+2", 3, False, None, 240, "", True, 1.0, 0, failed_requests=failed)

    assert summarise([outcome(0, 0), outcome(1, 3), outcome(2, 1)])["train"]["episodes_with_failed_requests"] == 2


def test_the_watcher_judges_each_text_when_written_not_every_chunk_that_reuses_it():
    """With a dual-rate policy most chunks pre-fill the cached text (`reasoning_refreshed` false): the
    text was written once, for the scene of its own observation, and is judged once. Every chunk
    whose text was written for it (every observation getting new text) is judged, repeats included."""
    import numpy as np

    from chatvla.client.connection import ChunkReply
    from chatvla.client.robots.base import RobotObservation
    from chatvla.client.runtime import TickRecord
    from chatvla.client.safety import SafetyDecision, Verdict
    from chatvla.training.evaluate import _Watcher

    task = make_task("math_matching", seed=3, split="train")

    class Scene:
        def object_poses(self):
            return task.initial_poses()

        def check_success(self):
            class R:
                success = False
            return R()

    def tick(t: int, *replies: tuple[str, bool]) -> TickRecord:
        obs = RobotObservation({}, np.zeros(8, np.float32), 0.0)
        rs = tuple(ChunkReply(t, t, np.zeros((16, 8)), 0.0, text, refreshed) for text, refreshed in replies)
        return TickRecord(t, 0.0, obs, rs, (), (), None, None, SafetyDecision(Verdict.HOLD, None))

    w = _Watcher(Scene(), task, 1 / 15, film=False)
    a, b = "1+2=3. Pick card 3 at (0, 0), place at (0, 0).", "1+2=3. Pick card 3 at (2, 0), place at (0, 0)."
    w.on_tick(tick(1, (a, True)))
    w.on_tick(tick(2, (a, False), (a, False)))  # re-used: not judged again
    w.on_tick(tick(3, (b, False)))  # a background refresh's new text, first seen: judged
    w.on_tick(tick(4, (b, True), (b, True)))  # written for these observations: judged, repeats too
    assert w.reasonings == [a, b, b, b] and len(w.reasoning_poses) == 4 and w.last_text == b
