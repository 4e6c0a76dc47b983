"""Closed-loop evaluation through the real stack: a `chatvla serve` process, the gRPC policy client,
the chunk executor, the safety filter, and a MuJoCo robot, exactly as a user runs them.

Three modes, each on its own episodes:
- `train`: boards drawn from the training numbers (new layouts and seeds: no episode seen in training);
- `heldout`: the answer is a held-out number never seen in training;
- `override`: training-split boards, but every observation carries a supplied reasoning naming a wrong
  card that lies on the table, written as the model writes its own ("..=36. Pick card 28 at (x, y),
  place at (x, y).", with that card's current place, refreshed every tick like the model's own text):
  how often the robot places the card the text names is the paper's reasoning-following claim as a
  number.

Per episode: success (the task's own check at the end), time to first success, the reasoning texts of
the chunks and whether they state the right sum and card, and (override) which card ended on the zone.

Toy placement on the bimanual rig (`kind="toy_placement"`) runs the same three modes: `train` (training
toys, new layouts), `heldout` (held-out toys only), `override` (training toys; every observation
carries the reasoning for another relation, with the subject's current place and the new destination,
"Put red cube (4, -10) in front of blue ball: place at (-6, 6)."; counted as followed when the subject
ends where that text says, by the task's own check for that relation).
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from chatvla.client.executor import ExecutorConfig
from chatvla.client.lockstep import DEFAULT_LATENCY_TICKS
from chatvla.client.runtime import TickRecord
from chatvla.client.sim.tasks import MathMatchingTask, Pose, Task, make_task
from chatvla.client.sim.tasks.base import resting
from chatvla.client.sim.tasks.math_matching import CARD_HALF, FACE_UP_COS, card_name
from chatvla.client.sim.tasks.toy_placement import ToyPlacementTask
from chatvla.profiles import FRANKA_JOINT
from chatvla.training.data import TASK_PROFILES
from chatvla.training.labels import (
    ReasoningJudgement,
    ToyJudgement,
    judge,
    judge_reasoning,
    override_relation,
    override_text,
    toy_text,
)

MODES = ("train", "heldout", "override")
MODE_SEED_OFFSETS = {"train": 0, "heldout": 100_000, "override": 200_000}  # added to EVAL_SEED_BASE + index
EVAL_SEED_BASE = 500_000  # task seeds for evaluation: far from the recorded training episodes' seeds
FILM_EVERY_S = 1.5


@dataclass
class EpisodeOutcome:
    mode: str
    seed: int
    board: str
    answer: int
    success: bool
    seconds_to_success: float | None
    ticks: int
    reasoning_first: str
    reasoning_correct_first: bool
    reasoning_correct_fraction: float
    stalls: int
    failed_requests: int = 0  # answered with an error (e.g. a state refused as outside the profile's range)
    reasoning_place_first: bool | None = None  # the card's place stated within 2 cm
    reasoning_place_fraction: float | None = None  # ... in every chunk's text (scene when the reply came)
    override_card: int | None = None
    override_followed: bool | None = None  # the named card lies on the zone
    answer_card_placed: bool | None = None  # the true answer's card lies on the zone
    error: str = ""


@dataclass
class ToyEpisodeOutcome:
    """One toy-placement episode; the reasoning is judged on subject, relation and reference."""

    mode: str
    seed: int
    instruction: str
    subject: str
    relation: str
    reference: str
    success: bool
    seconds_to_success: float | None
    ticks: int
    reasoning_first: str
    reasoning_correct_first: bool
    reasoning_correct_fraction: float
    stalls: int
    failed_requests: int = 0  # answered with an error instead of a chunk
    reasoning_place_first: bool | None = None  # the subject's place and its destination stated within 2 cm
    reasoning_place_fraction: float | None = None  # ... in every chunk's text (scene when the reply came)
    override_relation: str | None = None
    override_followed: bool | None = None  # the subject ends where the supplied text says
    instruction_followed: bool | None = None  # ... where the instruction says instead
    error: str = ""


Outcome = EpisodeOutcome | ToyEpisodeOutcome


@dataclass
class ReasoningSteer:
    """A tick observer that makes every observation carry `text(poses)` as its reasoning, written for
    the scene as it is at that tick (a named card's place moves when the card does): the override
    mode here, and the true text that diagnostics supply to watch the expert apart from the reading.
    Pass `attach` as `run_episode`'s `on_loop`, so the first observation carries it too."""

    robot: Any
    text: Callable[[dict[str, Pose]], str]
    loop: Any = None

    def attach(self, loop: Any) -> None:
        self.loop = loop
        self.on_tick(None)

    def on_tick(self, record: TickRecord | None) -> None:
        if self.loop is not None:
            self.loop.set_reasoning_override(self.text(self.robot.object_poses()))


@dataclass
class _Watcher:
    """Per-tick observer: reasoning texts, first success, filmstrip frames."""

    robot: Any
    task: Task
    dt: float
    film: bool
    camera: str = "front"  # the filmstrip's camera
    reasonings: list[str] = field(default_factory=list)  # each text the model wrote, in order
    reasoning_poses: list[dict[str, Pose]] = field(default_factory=list)  # the scene as each text arrived
    last_text: str = ""  # the text of the latest chunk, written or re-used (the filmstrip's caption)
    first_success_tick: int | None = None
    frames: list[tuple[float, np.ndarray, str]] = field(default_factory=list)

    def on_tick(self, record: TickRecord) -> None:
        for r in record.replies:
            # A text is judged once, when written: a chunk that re-uses the cached text (a dual-rate
            # policy, `reasoning_refreshed` false) adds nothing the model said about the scene then.
            if r.reasoning and (r.reasoning_refreshed or r.reasoning != self.last_text):
                self.reasonings.append(r.reasoning)
                self.reasoning_poses.append(self.robot.object_poses())
            self.last_text = r.reasoning or self.last_text
        if self.first_success_tick is None and record.tick % 5 == 0 and self.robot.check_success().success:
            self.first_success_tick = record.tick
        if self.film and record.tick % max(1, round(FILM_EVERY_S / self.dt)) == 0:
            img = record.observation.images.get(self.camera)
            if img is not None:
                self.frames.append((record.tick * self.dt, np.asarray(img).copy(), self.last_text))


def place_fraction(judged: Sequence[ReasoningJudgement | ToyJudgement]) -> float | None:
    """The share of an episode's texts that state the places right, each judged against the scene as it
    was when it arrived (every chunk's when every observation gets new text; with a dual-rate policy,
    each text when written): a text that flips between two cards' places from chunk to chunk sends the arm
    between them, which the first text alone does not show."""
    return float(np.mean([bool(j.place_ok) for j in judged])) if judged else None


def card_on_zone(robot: Any, task: MathMatchingTask, number: int) -> bool:
    """Card `number` lies face up, at rest, on the target zone (the success rule, for any card)."""
    pose = robot.object_poses()[card_name(number)]
    zone = next(f for f in task.fixtures if f.name == task.zone)
    inside = abs(pose.pos[0] - zone.xy[0]) <= zone.half_size[0] and abs(pose.pos[1] - zone.xy[1]) <= zone.half_size[1]
    return bool(inside and resting(pose, CARD_HALF[2]) and pose.rot[2, 2] >= FACE_UP_COS)


def wrong_card(task: MathMatchingTask) -> int:
    """The card an override names: a card on the table that is not the answer (deterministic)."""
    others = sorted(n for n in task.card_numbers if n != task.answer)
    return others[task.seed % len(others)]


TOY_OVERRIDE_STRIDE = 10_000  # a toy override seed with no other relation that fits tries this much further


def episode_task(mode: str, index: int, kind: str = "math_matching") -> Task:
    """The task of episode `index` of `mode`: seeds from `EVAL_SEED_BASE`, far from recorded ones. A toy
    override episode needs another relation whose spot is free and reachable; a seed without one is
    replaced by the next at `TOY_OVERRIDE_STRIDE` (deterministic)."""
    split = "heldout" if mode == "heldout" else "train"
    seed = EVAL_SEED_BASE + MODE_SEED_OFFSETS[mode] + index
    task = make_task(kind, seed=seed, split=split)
    if kind == "math_matching":
        assert isinstance(task, MathMatchingTask)
        return task
    assert isinstance(task, ToyPlacementTask)
    while mode == "override" and override_relation(task) is None:
        seed += TOY_OVERRIDE_STRIDE
        task = make_task(kind, seed=seed, split=split)
        assert isinstance(task, ToyPlacementTask)
    return task


def run_one(robot: Any, addresses: Sequence[str], mode: str, index: int, seconds: float, *, film: bool = False,
            token: str | None = None, kind: str = "math_matching", latency_ticks: int | None = None,
            jitter_ticks: int = 0, executor_config: ExecutorConfig | None = None,
            ) -> tuple[Outcome, list[tuple[float, np.ndarray, str]]]:
    from chatvla.client.episodes import run_episode

    task = episode_task(mode, index, kind)
    robot.reset(task)
    poses0 = robot.object_poses()
    dt = robot.profile.dt
    override: Callable[[dict[str, Pose]], str] | None = None
    named_card = named_relation = None
    if mode == "override" and isinstance(task, ToyPlacementTask):
        named_relation = override_relation(task)
        assert named_relation is not None  # episode_task picks seeds that have one
        override = partial(toy_text, task, named_relation)
    elif mode == "override" and isinstance(task, MathMatchingTask):
        named_card = wrong_card(task)
        override = partial(override_text, task, named_card)
    watcher = _Watcher(robot, task, dt, film, camera=robot.profile.cameras[0].name)
    steer = ReasoningSteer(robot, override) if override is not None else None
    res = run_episode(robot, addresses, task.instruction, max_ticks=max(1, round(seconds / dt)),
                      observers=[watcher] if steer is None else [steer, watcher], token=token,
                      robot_id=f"eval-{mode}-{index}", on_loop=steer.attach if steer is not None else None,
                      latency_ticks=latency_ticks, jitter_ticks=jitter_ticks, executor_config=executor_config)
    result = robot.check_success()
    # One judgement per text, against the scene when it arrived (the sum and card do not depend on it).
    judgements = [judge(task, t, p) for t, p in zip(watcher.reasonings, watcher.reasoning_poses)]
    judged = [j.correct for j in judgements]
    first = watcher.reasonings[0] if watcher.reasonings else ""
    ex = dict(res.summary.get("executor", {}))
    seconds_to_success = (watcher.first_success_tick * dt if result.success and watcher.first_success_tick
                          is not None else None)
    common: dict[str, Any] = dict(  # the fields both kinds' outcomes share, judged by the kind's own judge
        success=bool(result.success), seconds_to_success=seconds_to_success, ticks=res.ticks,
        reasoning_first=first, reasoning_correct_first=bool(judged and judged[0]),
        reasoning_correct_fraction=float(np.mean(judged)) if judged else 0.0, stalls=int(ex.get("stalls", 0)),
        failed_requests=int(sum(dict(res.summary.get("failures", {})).values())),
        reasoning_place_first=judge(task, first, poses0).place_ok if first else None,
        reasoning_place_fraction=place_fraction(judgements),
    )
    if isinstance(task, ToyPlacementTask):
        toy = ToyEpisodeOutcome(mode=mode, seed=task.seed, instruction=task.instruction, subject=task.subject,
                                relation=task.relation, reference=task.reference, **common)
        if named_relation is not None:
            toy.override_relation = named_relation
            toy.override_followed = bool(replace(task, relation=named_relation).check(robot.object_poses()).success)
            toy.instruction_followed = bool(result.success)
        return toy, watcher.frames
    assert isinstance(task, MathMatchingTask)
    out = EpisodeOutcome(mode=mode, seed=task.seed, board=f"{task.a}+{task.b}", answer=task.answer, **common)
    if named_card is not None:
        out.override_card = named_card
        out.override_followed = card_on_zone(robot, task, named_card)
        out.answer_card_placed = card_on_zone(robot, task, task.answer)
    return out, watcher.frames


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (round(max(0.0, c - h), 4), round(min(1.0, c + h), 4))


def rate(flags: Sequence[bool]) -> dict[str, Any]:
    k, n = int(sum(bool(f) for f in flags)), len(flags)
    return {"k": k, "n": n, "rate": round(k / n, 4) if n else None, "ci95": wilson(k, n)}


def summarise(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        eps = [o for o in outcomes if o.mode == mode and not o.error]
        if not eps:
            continue
        times = [o.seconds_to_success for o in eps if o.seconds_to_success is not None]
        s: dict[str, Any] = {
            "episodes": len(eps),
            "errors": sum(1 for o in outcomes if o.mode == mode and o.error),
            "success": rate([o.success for o in eps]),
            "seconds_to_success_median": round(float(np.median(times)), 2) if times else None,
            "stall_ticks_mean": round(float(np.mean([o.stalls for o in eps])), 2),
            "episodes_with_failed_requests": sum(1 for o in eps if o.failed_requests),
        }
        if mode != "override":  # in override mode the text is ours, not the model's
            s["reasoning_correct_first"] = rate([o.reasoning_correct_first for o in eps])
            s["reasoning_place_within_2cm_first"] = rate([bool(o.reasoning_place_first) for o in eps])
            s["reasoning_correct_all_chunks"] = round(float(np.mean([o.reasoning_correct_fraction for o in eps])), 4)
            fractions = [o.reasoning_place_fraction for o in eps if o.reasoning_place_fraction is not None]
            if fractions:
                s["reasoning_place_within_2cm_all_chunks"] = round(float(np.mean(fractions)), 4)
        else:
            s["override_followed"] = rate([bool(o.override_followed) for o in eps])
            if isinstance(eps[0], ToyEpisodeOutcome):
                s["instruction_followed_instead"] = rate([bool(o.instruction_followed) for o in eps
                                                          if isinstance(o, ToyEpisodeOutcome)])
            else:
                s["answer_card_placed_instead"] = rate([bool(o.answer_card_placed) for o in eps
                                                        if isinstance(o, EpisodeOutcome)])
        out[mode] = s
    return out


def describe(o: Outcome) -> str:
    """The episode's task in a few words (progress lines, report)."""
    if isinstance(o, ToyEpisodeOutcome):
        return f"{o.subject} {o.relation} {o.reference}"
    return f"{o.board}={o.answer}"


def failed_outcome(mode: str, index: int, kind: str, error: str) -> Outcome:
    """The outcome of an episode that raised: reported as a failure with its error."""
    task = episode_task(mode, index, kind)
    if isinstance(task, ToyPlacementTask):
        return ToyEpisodeOutcome(mode, task.seed, task.instruction, task.subject, task.relation, task.reference,
                                 False, None, 0, "", False, 0.0, 0, error=error)
    assert isinstance(task, MathMatchingTask)
    return EpisodeOutcome(mode, task.seed, f"{task.a}+{task.b}", task.answer, False, None, 0, "", False, 0.0, 0,
                          error=error)


def run_eval(addresses: Sequence[str], modes: Sequence[str], episodes: int, *, robots: int = 2,
             seconds: float = 20.0, film_episodes: int = 2, token: str | None = None,
             progress: bool = True, kind: str = "math_matching",
             first: int = 0, latency_ticks: int | None = DEFAULT_LATENCY_TICKS,
             jitter_ticks: int = 0, executor_config: ExecutorConfig | None = None,
             ) -> tuple[list[Outcome], dict[str, list]]:
    """Run `episodes` per mode of task `kind` (episode indices `first` on) with `robots` simulated
    robots (the kind's rig) in parallel against the server(s). Each chunk lands `latency_ticks` after
    its observation on simulated time (chatvla.client.lockstep), so the figures do not move with the
    host's speed or load, plus up to `jitter_ticks` drawn per answer; None runs on wall time, with
    whatever latency the server gives. `executor_config` replaces the robots' chunk-executor defaults."""
    from chatvla.client.sim.robot import make_sim_robot

    jobs: queue.Queue[tuple[str, int]] = queue.Queue()
    for mode in modes:
        for i in range(first, first + episodes):
            jobs.put((mode, i))
    total = jobs.qsize()
    outcomes: list[Outcome] = []
    films: dict[str, list] = {}
    lock = threading.Lock()
    t0 = time.monotonic()

    def worker() -> None:
        robot = None
        try:
            while True:
                try:
                    mode, i = jobs.get_nowait()
                except queue.Empty:
                    return
                if robot is None:
                    robot = make_sim_robot(TASK_PROFILES[kind], episode_task(mode, i, kind))
                film = i - first < film_episodes
                try:
                    o, frames = run_one(robot, addresses, mode, i, seconds, film=film, token=token, kind=kind,
                                        latency_ticks=latency_ticks, jitter_ticks=jitter_ticks,
                                        executor_config=executor_config)
                except Exception as e:  # one broken episode is reported, the evaluation goes on
                    o, frames = failed_outcome(mode, i, kind, f"{type(e).__name__}: {e}"), []
                with lock:
                    outcomes.append(o)
                    if frames:
                        films[f"{mode}-{i}"] = [(t, f, r, o.success) for t, f, r in frames]
                    if progress:
                        done = len(outcomes)
                        eta = (time.monotonic() - t0) / done * (total - done)
                        if isinstance(o, ToyEpisodeOutcome):
                            extra = ("" if o.override_relation is None
                                     else f"; override {o.override_relation} followed: {o.override_followed}")
                        else:
                            extra = ("" if o.override_card is None
                                     else f"; override card {o.override_card} placed: {o.override_followed}")
                        print(f"[eval] {done}/{total} {mode} #{i} {describe(o)}: "
                              f"{'success' if o.success else 'fail'}; reasoning {o.reasoning_first!r}{extra}"
                              f"{f'; ERROR {o.error}' if o.error else ''} (ETA {eta:.0f} s)",
                              file=sys.stderr, flush=True)
        finally:
            if robot is not None:
                robot.close()

    threads = [threading.Thread(target=worker, name=f"eval-robot{k}", daemon=True) for k in range(robots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes.sort(key=lambda o: (MODES.index(o.mode), o.seed))
    return outcomes, films


def outcomes_json(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    return [asdict(o) for o in outcomes]


def read_boards(model: Any, seeds: Sequence[int], split: str = "train", *,
                camera_order: Sequence[str] | None = None) -> list[tuple[MathMatchingTask, str, bool]]:
    """Open-loop reasoning check without a server: render each task's scene at rest with the rig's
    cameras and let `model` (a ChatVLA2) write its reasoning; (task, text, correct) per seed.
    `camera_order` overrides the profile's order (to show that the order matters)."""
    from chatvla.client.sim.robot import make_sim_robot

    tasks = [make_task("math_matching", seed=s, split=split) for s in seeds]
    robot = make_sim_robot(FRANKA_JOINT.name, tasks[0])
    out = []
    try:
        for task in tasks:
            assert isinstance(task, MathMatchingTask)
            obs = robot.reset(task)
            prepared = model.prepare(obs.images, task.instruction, camera_order=camera_order)
            text = model.reason([prepared])[0].text
            out.append((task, text, judge_reasoning(task, text).correct))
    finally:
        robot.close()
    return out
