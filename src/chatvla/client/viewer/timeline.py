"""What the viewer shows on each tick, derived once from an episode file's records.

Both renderers (video frames and the HTML page) read this instead of the raw records, so they agree on
what "the reasoning in effect", "the image of camera X at tick t" and "a stalled tick" mean; stalled and
safety-clamped come from chatvla.client.tick_counts, the definitions `chatvla inspect` and `chatvla demo`
print.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from chatvla.client.recording import EncodedImage, Episode
from chatvla.client.tick_counts import TickCounts, count_ticks, tick_statuses
from chatvla.profiles import RobotProfile


@dataclass(frozen=True)
class EpisodeView:
    """Per-tick arrays of one episode; index i is the i-th recorded tick (tick numbers may have gaps)."""

    profile: RobotProfile
    instruction: str
    cameras: tuple[str, ...]
    ticks: np.ndarray  # int64 [n], the tick numbers
    seconds: np.ndarray  # float64 [n], time since the first tick
    actions: np.ndarray  # float64 [n, action_dim]; NaN on a tick without an action
    states: np.ndarray  # float64 [n, action_dim]: the state entry with the action's name, NaN if none
    statuses: tuple[str, ...]  # tick_counts.OK / STARTUP / STALLED
    interventions: tuple[tuple[str, ...], ...]
    reasoning_changes: tuple[tuple[int, str], ...]  # (index, text) where the text in effect changed
    reasoning_index: np.ndarray  # int64 [n]: entry of reasoning_changes in effect, -1 before any text
    images: tuple[Mapping[str, EncodedImage | None], ...]  # newest image of each camera at or before i
    counts: TickCounts
    closed_cleanly: bool
    outcome: Mapping[str, Any] | None

    def __len__(self) -> int:
        return len(self.ticks)

    def reasoning_at(self, i: int) -> str:
        """The reasoning text in effect on tick index i ("" before the first text arrived)."""
        k = int(self.reasoning_index[i])
        return self.reasoning_changes[k][1] if k >= 0 else ""


def build_view(ep: Episode) -> EpisodeView:
    """Derive the viewer's per-tick data. Reasoning: a chunk that carries text makes it the text in
    effect until a chunk with different text arrives (a chunk without text leaves it standing, since
    the actions that run are still the ones that text led to). Images: a camera without an image on a
    tick (recorded every Nth tick, say) shows its last one, so every frame has every camera."""
    p = ep.header.profile
    recs = ep.records
    n, d = len(recs), p.action_dim
    state_pos = {name: i for i, name in enumerate(p.state_names)}
    pairs = [(j, state_pos[name]) for j, name in enumerate(p.action_names) if name in state_pos]
    actions = np.full((n, d), np.nan)
    states = np.full((n, d), np.nan)
    changes: list[tuple[int, str]] = []
    rindex = np.full(n, -1, dtype=np.int64)
    images: list[Mapping[str, EncodedImage | None]] = []
    latest: dict[str, EncodedImage | None] = dict.fromkeys(ep.header.cameras)
    for i, r in enumerate(recs):
        if r.action is not None:
            actions[i] = r.action
        for j, k in pairs:
            states[i, j] = r.state[k]
        text = r.chunk.reasoning.strip() if r.chunk is not None else ""
        if text and (not changes or changes[-1][1] != text):
            changes.append((i, text))
        rindex[i] = len(changes) - 1
        latest.update({name: img for name, img in r.images.items() if name in latest})
        images.append(dict(latest))
    no_action = [r.stall for r in recs]
    interventions = tuple(tuple(r.interventions) for r in recs)
    t0 = recs[0].timestamp if recs else 0.0
    return EpisodeView(
        profile=p,
        instruction=ep.header.instruction,
        cameras=tuple(ep.header.cameras),
        ticks=np.array([r.tick for r in recs], dtype=np.int64),
        seconds=np.array([r.timestamp - t0 for r in recs], dtype=np.float64),
        actions=actions,
        states=states,
        statuses=tuple(tick_statuses(no_action)),
        interventions=interventions,
        reasoning_changes=tuple(changes),
        reasoning_index=rindex,
        images=tuple(images),
        counts=count_ticks(no_action, interventions),
        closed_cleanly=ep.footer is not None,
        outcome=dict(ep.footer.outcome) if ep.footer is not None else None,
    )
