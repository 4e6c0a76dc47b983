"""What the virtual robots replay: recorded episodes (`chatvla.episode` files), or synthetic ones.

A replayed tick gives the robot the state and images the real robot saw on that tick. Episodes may
store images only every Nth tick; the newest image of each camera up to that tick is used (or the first
one, before any was recorded). Images stay encoded (JPEG) in memory and are decoded only for the ticks
on which the executor actually sends an observation, so a long recording costs its file size, not its
pixels, and the load generator's CPU goes to what a robot would do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatvla.client.recording import EncodedImage, EpisodeFormatError, read_episode
from chatvla.profiles import RobotProfile

EPISODE_SUFFIX = ".chatvla"
MAX_EPISODE_FILES = 1000
MAX_TOTAL_BYTES = 4 << 30  # recordings kept in memory (encoded) at most


class SourceError(ValueError):
    """Recordings that cannot be replayed (none found, unreadable, or for another robot profile)."""


@dataclass(frozen=True)
class ReplayEpisode:
    """One episode, ready to replay at its profile's control rate."""

    name: str
    profile: RobotProfile
    instruction: str
    states: np.ndarray  # float32 [T, state_dim]
    cameras: tuple[str, ...]
    # images[c][k]: the image camera c shows on tick k (shared objects where carried forward)
    images: Mapping[str, Sequence[EncodedImage | np.ndarray]]

    @property
    def length(self) -> int:
        return len(self.states)

    @property
    def rate_hz(self) -> float:
        return self.profile.control_rate_hz

    def observation(self, k: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(images, state) of tick `k`, images decoded to HxWx3 uint8."""
        imgs = {}
        for cam in self.cameras:
            im = self.images[cam][k]
            imgs[cam] = im.decode() if isinstance(im, EncodedImage) else im
        return imgs, self.states[k]


def find_recordings(path: str | Path) -> list[Path]:
    """A file, or every `*.chatvla` file under a directory (sorted, at most MAX_EPISODE_FILES)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise SourceError(f"{p}: no such file or directory")
    files = sorted(f for f in p.rglob(f"*{EPISODE_SUFFIX}") if f.is_file())
    if not files:
        raise SourceError(f"{p}: no {EPISODE_SUFFIX} recordings found (use --synthetic to run without any)")
    if len(files) > MAX_EPISODE_FILES:
        files = files[:MAX_EPISODE_FILES]
    return files


def load_episode(path: Path) -> ReplayEpisode:
    try:
        ep = read_episode(path, allow_truncated=True)
    except (EpisodeFormatError, OSError) as e:
        raise SourceError(f"{path}: {e}") from None
    if not ep.records:
        raise SourceError(f"{path}: the episode has no ticks")
    cams = tuple(ep.header.cameras)
    per_cam: dict[str, list[EncodedImage | None]] = {c: [] for c in cams}
    last: dict[str, EncodedImage | None] = dict.fromkeys(cams)
    for rec in ep.records:
        for c in cams:
            if c in rec.images:
                last[c] = rec.images[c]
            per_cam[c].append(last[c])
    images: dict[str, list[EncodedImage]] = {}
    for c in cams:
        first = next((im for im in per_cam[c] if im is not None), None)
        if first is None:
            continue  # a camera that never recorded a frame is not sent
        images[c] = [im if im is not None else first for im in per_cam[c]]
    if not images:
        raise SourceError(f"{path}: the episode has no images")
    states = np.stack([r.state for r in ep.records]).astype(np.float32)
    return ReplayEpisode(
        name=path.name, profile=ep.header.profile, instruction=ep.header.instruction or "replay",
        states=states, cameras=tuple(images), images=images,
    )


def load_recordings(path: str | Path, profile: RobotProfile | None = None) -> list[ReplayEpisode]:
    """Every replayable episode under `path`; with `profile`, only episodes recorded for that profile
    (the server's): the others are refused with a message naming them."""
    files = find_recordings(path)
    total = sum(f.stat().st_size for f in files)
    if total > MAX_TOTAL_BYTES:
        raise SourceError(f"{path}: {total / 2**30:.1f} GiB of recordings; at most {MAX_TOTAL_BYTES >> 30} GiB")
    episodes = [load_episode(f) for f in files]
    if profile is not None:
        wrong = [e for e in episodes if e.profile.name != profile.name]
        episodes = [e for e in episodes if e.profile.name == profile.name]
        if not episodes:
            names = sorted({e.profile.name for e in wrong})
            raise SourceError(f"{path}: recordings are for {', '.join(names)}; the server serves {profile.name}")
        if wrong:
            import logging

            logging.getLogger(__name__).warning(
                "skipping %d recordings for another profile (%s)", len(wrong), wrong[0].name
            )
    return episodes


def synthetic_episodes(
    profile: RobotProfile, *, count: int = 4, seconds: float = 20.0, frames: int = 8, seed: int = 0
) -> list[ReplayEpisode]:
    """Episodes for `profile` without recordings: a slow sinusoid around the home pose (or the middle of
    the joint range) and a few camera-like frames (smooth gradients plus noise) cycling per camera."""
    rng = np.random.default_rng(seed)
    lo, hi = np.asarray(profile.action_lower, np.float32), np.asarray(profile.action_upper, np.float32)
    n = profile.state_dim
    center = np.asarray(profile.home, np.float32)[:n] if profile.home else ((lo + hi) / 2)[:n]
    amp = (0.05 * (hi - lo))[:n]
    ticks = max(1, math.ceil(seconds * profile.control_rate_hz))
    out = []
    for e in range(count):
        t = np.arange(ticks, dtype=np.float32)[:, None] / profile.control_rate_hz
        phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        states = np.clip(center + amp * np.sin(0.5 * t + phase), lo[:n], hi[:n]).astype(np.float32)
        images: dict[str, list[np.ndarray]] = {}
        for ci, cam in enumerate(profile.cameras):
            yy, xx = np.mgrid[0 : cam.height, 0 : cam.width].astype(np.float32)
            pool = []
            for f in range(frames):
                shift = 8.0 * f + 40.0 * ci + 97.0 * e
                base = np.stack([(xx + shift) % 256, (yy + 0.5 * shift) % 256, ((xx + yy) / 2 + shift) % 256], -1)
                pool.append(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))
            images[cam.name] = [pool[(k // 4) % frames] for k in range(ticks)]
        out.append(ReplayEpisode(
            name=f"synthetic-{e}", profile=profile, instruction=f"synthetic load test task {e}",
            states=states, cameras=profile.camera_names, images=images,
        ))
    return out
