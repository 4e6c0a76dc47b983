"""Training data: recorded demonstrations (`chatvla record --policy oracle`) plus rendered scenes.

Episodes keep their images JPEG/PNG-encoded in memory and are decoded per batch, so a few hundred
episodes fit in RAM. Every episode's task is rebuilt from its header (kind, seed, split), which gives
the reasoning label; an episode whose task is not from the training split, or that shows a held-out
number or a held-out toy anywhere, is refused: held-out numbers and toys must appear nowhere in
training.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from chatvla.client.recording import EncodedImage, read_episode
from chatvla.client.sim.catalog import TRAIN_NUMBERS, TRAIN_TOYS
from chatvla.client.sim.tasks import MathMatchingTask, Pose, Task, make_task
from chatvla.client.sim.tasks.math_matching import card_name
from chatvla.client.sim.tasks.toy_placement import ToyPlacementTask, toy_name
from chatvla.model.config import NormStats
from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_JOINT, RobotProfile
from chatvla.training.labels import place_targets, reasoning_for, scene_pairs

if TYPE_CHECKING:  # the sim (mujoco) is needed only to render scenes
    from chatvla.client.sim.robot import SimRobot

# The rig each trainable task is recorded and evaluated on (`chatvla record --robot sim-panda /
# sim-bimanual`), by profile name; and the preset `chatvla train` starts from for it.
TASK_PROFILES: dict[str, str] = {"math_matching": FRANKA_JOINT.name, "toy_placement": ARX_R5_BIMANUAL.name}
TASK_PRESETS: dict[str, str] = {"math_matching": "tiny-sim", "toy_placement": "tiny-sim-bimanual"}


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and the reason."""


@dataclass
class RobotEpisode:
    path: str
    task: Task
    instruction: str
    reasoning: list[str]  # per tick: what a correct model says about the scene it sees then
    images: list[dict[str, EncodedImage | np.ndarray]]  # per tick, camera -> image
    states: np.ndarray  # [T, state_dim] float32
    actions: np.ndarray  # [T, action_dim] float32
    poses0: dict[str, Pose] | None = None  # object poses at the first tick (task frame)
    places: np.ndarray | None = None  # [T, 5] per tick: labels.place_targets (math matching only: toy rows
    # carry none, and a stage-1 batch then skips the place read-out, see batches.collate)
    retry: bool = False  # a recovery demonstration's retry: its first frame shows the arm above the table

    def chunk(self, t: int, horizon: int) -> np.ndarray:
        """Actions for ticks t .. t+horizon-1; past the end the last action is held (the arm rests)."""
        idx = np.minimum(np.arange(t, t + horizon), len(self.actions) - 1)
        return self.actions[idx]


@dataclass
class Scene:
    """A rendered scene at rest with questions about it (stage-1 image-text data). A rendered scene also
    carries the task's instruction and the reasoning a correct model writes for it: the robot episodes
    show only a few hundred layouts, which the VLM learns by heart (trained on them alone, it stated the
    card's place within 2 cm on 22 of 30 recorded layouts and 0 of 30 new ones, and read 18 of 30 new
    boards: benchmarks/localisation.py), so the reasoning is also taught on every rendered layout."""

    images: dict[str, np.ndarray]
    pairs: list[tuple[str, str]]
    instruction: str | None = None
    reasoning: str | None = None
    # camera -> card number -> (column, row) of the card's centre in that camera's image: which vision
    # token shows which card, for the card-token loss (rendered math-matching scenes only)
    card_pixels: dict[str, dict[int, tuple[float, float]]] | None = None
    # card number -> (x, y) of the card in the task frame (metres): where the token that shows it lies on
    # the table, for the card-place loss
    card_places: dict[int, tuple[float, float]] | None = None


@dataclass
class Dataset:
    profile: RobotProfile
    episodes: list[RobotEpisode] = field(default_factory=list)
    scenes: list[Scene] = field(default_factory=list)

    @property
    def ticks(self) -> int:
        return sum(len(e.actions) for e in self.episodes)

    def stats(self, relative_to_state: tuple[int, ...] = (), *, per_row: bool = False) -> NormStats:
        """Min-max for actions (widened where a dimension barely moves), mean/std for states. Dimensions
        predicted relative to the state get the range of (chunk action - state) over every chunk.
        `per_row` adds a range for every chunk row (`NormStats.action_min_rows`), each widened and
        clipped the same way."""
        h = self.profile.chunk_size
        chunks = []
        for e in self.episodes:
            idx = np.minimum(np.arange(len(e.actions))[:, None] + np.arange(h)[None], len(e.actions) - 1)
            c = e.actions[idx].astype(np.float64)
            rel = list(relative_to_state)
            if rel:
                c[..., rel] -= e.states[:, None, rel]
            chunks.append(c)
        acts = np.concatenate(chunks)  # [ticks, H, A]
        states = np.concatenate([e.states for e in self.episodes]).astype(np.float64)
        lower, upper = np.asarray(self.profile.action_lower), np.asarray(self.profile.action_upper)
        absolute = np.ones(acts.shape[-1], bool)
        absolute[list(relative_to_state)] = False

        def bounds(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            pad = np.maximum(0.05 * (hi - lo), 1e-3)
            lo, hi = lo - pad, hi + pad
            return np.where(absolute, np.maximum(lo, lower), lo), np.where(absolute, np.minimum(hi, upper), hi)

        lo, hi = bounds(acts.min((0, 1)), acts.max((0, 1)))
        rows_lo, rows_hi = bounds(acts.min(0), acts.max(0)) if per_row else (None, None)
        std = np.maximum(states.std(0), 1e-3)
        return NormStats(
            tuple(map(float, lo)), tuple(map(float, hi)), tuple(map(float, states.mean(0))), tuple(map(float, std)),
            action_min_rows=None if rows_lo is None else tuple(tuple(map(float, r)) for r in rows_lo),
            action_max_rows=None if rows_hi is None else tuple(tuple(map(float, r)) for r in rows_hi),
        )


def decode(image: EncodedImage | np.ndarray) -> np.ndarray:
    return image if isinstance(image, np.ndarray) else image.decode()


def tick_images(ep: RobotEpisode, t: int) -> dict[str, np.ndarray]:
    """Tick `t`'s camera images, decoded (episodes keep them encoded until a batch needs them)."""
    return {k: decode(v) for k, v in ep.images[t].items()}


def _check_train_only(task: Task, where: str) -> None:
    if task.split != "train":
        raise DataError(f"{where}: task split is {task.split!r}; training uses the train split only")
    if isinstance(task, MathMatchingTask):
        shown = {task.a, task.b, *task.card_numbers}
        leaked = sorted(shown - set(TRAIN_NUMBERS))
        if leaked:
            raise DataError(f"{where}: shows held-out numbers {leaked}")
    if isinstance(task, ToyPlacementTask):
        leaked_toys = sorted({o.name for o in task.objects} - {toy_name(t) for t in TRAIN_TOYS})
        if leaked_toys:
            raise DataError(f"{where}: shows held-out toys {leaked_toys}")


def load_episodes(paths: Iterable[str | Path], profile: RobotProfile, *, kinds: Sequence[str] = ("math_matching",),
                  progress: bool = True) -> list[RobotEpisode]:
    """Successful sim episodes of the given task kinds, recorded for `profile`."""
    files = sorted(p for d in paths for p in (Path(d).glob("*.chatvla") if Path(d).is_dir() else [Path(d)]))
    if not files:
        raise DataError(f"no episode files (*.chatvla) in {', '.join(map(str, paths))}")
    out: list[RobotEpisode] = []
    skipped = 0
    for i, f in enumerate(files):
        ep = read_episode(f)
        h = ep.header
        meta = dict(h.task)
        if h.profile.name != profile.name:
            raise DataError(f"{f}: recorded for profile {h.profile.name}, the model is {profile.name}")
        if meta.get("kind") not in kinds or not (ep.footer and ep.footer.outcome.get("success")):
            skipped += 1
            continue
        task = make_task(meta["kind"], seed=int(meta["seed"]), split=str(meta["split"]))
        _check_train_only(task, str(f))
        recs = [r for r in ep.records if r.action is not None]
        missing = [r.tick for r in recs if set(r.images) != set(profile.camera_names)]
        if missing:
            raise DataError(f"{f}: ticks {missing[:3]} lack camera images (record with --images-every 1)")
        states = np.stack([r.state for r in recs]).astype(np.float32)
        actions = np.stack([r.action for r in recs]).astype(np.float32)
        poses = replay_poses(profile, task, states, actions, str(f))
        first = retry_from(meta, len(recs), str(f))
        if first:  # a recovery demonstration: its deliberate miss is replayed above, never learned
            recs, states, actions, poses = recs[first:], states[first:], actions[first:], poses[first:]
        out.append(RobotEpisode(
            path=str(f), task=task, instruction=h.instruction,
            reasoning=[reasoning_for(task, p) for p in poses], images=[dict(r.images) for r in recs],
            states=states, actions=actions, poses0=poses[0],
            places=(np.stack([place_targets(task, p) for p in poses]) if isinstance(task, MathMatchingTask)
                    else None),
            retry=first > 0,
        ))
        if progress and (i + 1) % 50 == 0:
            print(f"[data] read {i + 1}/{len(files)} episode files", file=sys.stderr, flush=True)
    if not out:
        raise DataError(f"none of the {len(files)} episode files is a successful {'/'.join(kinds)} episode")
    if progress:
        print(f"[data] {len(out)} episodes, {sum(len(e.actions) for e in out)} ticks ({skipped} skipped: "
              "other task or not successful)", file=sys.stderr, flush=True)
    return out


def retry_from(meta: dict[str, object], ticks: int, where: str) -> int:
    """The tick a recovery demonstration's retry starts at (`chatvla record --oracle-miss`), 0 for a
    plain one: the ticks before it show the oracle missing on purpose, which a policy must not learn."""
    value = meta.get("retry_from", 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < ticks:
        raise DataError(f"{where}: retry_from {value!r} is not a tick of this {ticks}-tick episode")
    return value


_REPLAY: dict[str, object] = {}


def replay_poses(profile: RobotProfile, task: Task, states: np.ndarray, actions: np.ndarray, where: str
                 ) -> list[dict[str, Pose]]:
    """Object poses at every tick of a sim episode, by replaying its actions in the (deterministic) sim:
    recordings keep images, state and actions, not where the objects were. Refuses an episode whose
    replay drifts from the recorded joint states (recorded with another simulator build)."""
    from chatvla.client.sim.robot import SimRobot, make_sim_robot

    robot = _REPLAY.get(profile.name)
    if robot is None:
        robot = _REPLAY[profile.name] = make_sim_robot(profile.name, task, render=False)
    else:
        robot.reset(task)
    assert isinstance(robot, SimRobot)
    out = []
    for t, a in enumerate(actions):
        drift = float(np.abs(robot.state() - states[t]).max())
        if drift > 1e-3:
            raise DataError(f"{where}: replaying the episode drifts from the recorded state at tick {t} "
                            f"({drift:.4f}); was it recorded with another MuJoCo version?")
        out.append(robot.object_poses())
        robot.command(a)
    return out


def episode_scenes(episodes: Sequence[RobotEpisode], seed: int) -> list[Scene]:
    """Questions about each episode's first frame (the scene at rest, before the arm moves; a retry
    starts with the arm over the cards, so it asks none)."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for e in episodes:
        if not e.retry and isinstance(e.task, (MathMatchingTask, ToyPlacementTask)):
            poses = e.poses0 or e.task.initial_poses()
            out.append(Scene(tick_images(e, 0), scene_pairs(e.task, poses, rng, k=3)))
    return out


def card_pixels(robot: SimRobot, task: MathMatchingTask) -> dict[str, dict[int, tuple[float, float]]]:
    """camera -> card number -> (column, row) of the card's centre in that camera's image, as it is now."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for cam in robot.profile.camera_names:
        out[cam] = {}
        for n in task.card_numbers:
            col, row = robot.pixels_of(card_name(n), cam)
            out[cam][int(n)] = (float(col), float(row))
    return out


def card_places(task: MathMatchingTask, poses: dict[str, Pose]) -> dict[int, tuple[float, float]]:
    """card number -> (x, y) of the card in the task frame (metres), from the scene's object poses."""
    return {int(n): (float(poses[card_name(n)].pos[0]), float(poses[card_name(n)].pos[1])) for n in task.card_numbers}


FIRST_SCENE_SEED = 1_000_000  # rendered scenes' task seeds start here, far from any recorded episode's


def render_scenes(profile: RobotProfile, n: int, *, seed: int, first_task_seed: int = FIRST_SCENE_SEED,
                  kind: str = "math_matching", progress: bool = True) -> list[Scene]:
    """`n` extra scenes of task `kind` (training split, task seeds from `first_task_seed`) rendered at
    rest with the rig's cameras, each with three questions, the instruction and the reasoning. Needs
    the `sim` extra."""
    from chatvla.client.sim.robot import make_sim_robot

    rng = np.random.default_rng([seed, 11])
    robot = None
    out: list[Scene] = []
    try:
        for i in range(n):
            task = make_task(kind, seed=first_task_seed + i, split="train")
            _check_train_only(task, f"scene {i}")
            if robot is None:
                robot = make_sim_robot(profile.name, task)
                obs = robot.observe()
            else:
                obs = robot.reset(task)
            poses = robot.object_poses()
            pixels = places = None
            if isinstance(task, MathMatchingTask):
                pixels, places = card_pixels(robot, task), card_places(task, poses)
            out.append(Scene(dict(obs.images), scene_pairs(task, poses, rng, k=3), task.instruction,
                             reasoning_for(task, poses), pixels, places))
            if progress and (i + 1) % 200 == 0:
                print(f"[data] rendered {i + 1}/{n} scenes", file=sys.stderr, flush=True)
    finally:
        if robot is not None:
            robot.close()
    return out
