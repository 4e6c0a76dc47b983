"""Run one robot through episodes against a policy server, and watch what happens on every tick.

Shared by `chatvla demo` and `chatvla record`: the episode runner wires a robot, a fresh policy
session, a fresh executor and safety filter into one `ControlLoop`, and observers collect latency
statistics or write the episode file. A new session per episode keeps late replies of the previous
episode out of the next one: their ticks belong to a loop that no longer exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chatvla.client.config import ClientConfig, SessionConfig
from chatvla.client.connection import Clock, PolicyConnection
from chatvla.client.executor import ChunkExecutor, ExecutorConfig
from chatvla.client.lockstep import LockstepConnection, SimClock
from chatvla.client.policy_client import GrpcPolicyClient
from chatvla.client.recording import ChunkRecord, EpisodeWriter
from chatvla.client.robots.base import Robot
from chatvla.client.runtime import ControlLoop, TickObserver, TickRecord
from chatvla.client.safety import SafetyConfig, SafetyFilter
from chatvla.wire.vocabulary import TIMING_MS_FIELDS

LOCKSTEP_DEADLINE_MS = 60_000  # per observation on simulated time: the sim waits for slow answers


@dataclass
class LatencyObserver:
    """Client round trips (observation sent -> chunk received) and the server's stage timings."""

    round_trip_ms: list[float] = field(default_factory=list)
    server_ms: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in TIMING_MS_FIELDS})
    reasoning: list[str] = field(default_factory=list)
    chunks: int = 0
    _sent_at: dict[int, float] = field(default_factory=dict)

    def on_tick(self, record: TickRecord) -> None:
        if record.sent_seq is not None:
            self._sent_at[record.sent_seq] = record.time
        for reply in record.replies:
            self.chunks += 1
            sent = self._sent_at.pop(reply.seq, None)
            if sent is not None:
                self.round_trip_ms.append((reply.received_at - sent) * 1000.0)
            for k in TIMING_MS_FIELDS:
                if k in reply.timings:
                    self.server_ms[k].append(float(reply.timings[k]))
            if reply.reasoning and len(self.reasoning) < 50:
                self.reasoning.append(reply.reasoning)

    def percentiles(self) -> dict[str, dict[str, float]]:
        out = {"round_trip_ms": _pcts(self.round_trip_ms)}
        out.update({k: _pcts(v) for k, v in self.server_ms.items()})
        return out


def _pcts(xs: Sequence[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs, dtype=float)
    return {"n": len(xs), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


class EpisodeRecorder:
    """A `TickObserver` that writes every tick to an episode file (see docs/recording.md)."""

    def __init__(self, writer: EpisodeWriter, *, images_every: int = 1) -> None:
        self.writer = writer
        self.images_every = max(1, images_every)

    def on_tick(self, record: TickRecord) -> None:
        obs = record.observation
        chunk = None
        if record.replies:
            r = record.replies[-1]
            chunk = ChunkRecord(seq=r.seq, tick=r.tick, actions=np.asarray(r.actions, np.float32),
                                reasoning=r.reasoning, timings=dict(r.timings))
        self.writer.append(
            tick=record.tick,
            timestamp=record.time,
            state=obs.state,
            action=record.executed,
            images=obs.images if record.tick % self.images_every == 0 else None,
            chunk=chunk,
            stall=record.proposed is None,
            interventions=tuple(record.decision.interventions),
        )


@dataclass(frozen=True)
class EpisodeResult:
    ticks: int
    seconds: float
    success: bool | None
    summary: dict[str, object]


def run_episode(
    robot: Robot,
    addresses: Sequence[str],
    instruction: str,
    *,
    max_ticks: int,
    observers: Sequence[TickObserver] = (),
    token: str | None = None,
    executor_config: ExecutorConfig | None = None,
    safety_config: SafetyConfig | None = None,
    success: Callable[[], bool] | None = None,
    connect_timeout_s: float = 30.0,
    image_encoding: str = "rgb8",
    robot_id: str = "",
    reasoning_override: str | None = None,
    on_loop: Callable[[ControlLoop], None] | None = None,
    latency_ticks: int | None = None,
    jitter_ticks: int = 0,
) -> EpisodeResult:
    """Drive `robot` for `max_ticks` control ticks with chunks from the server at `addresses` (several
    replicas, or a `dns:///` name: the episode's session opens on the one `robot_id` ranks first that is
    healthy, see chatvla.client.balancing).

    `reasoning_override` makes every observation of the episode carry that reasoning text, so the
    action expert follows it instead of the model's own: the evaluation of "given this reasoning,
    does the robot do it?" (see `ControlLoop.set_reasoning_override`). `on_loop` receives the episode's
    control loop before it starts, for callers that steer it while it runs (e.g. an override that
    follows the scene).

    `latency_ticks` (simulated robots only) runs the episode on simulated time with every chunk landing
    that many ticks after its observation, whatever the server's speed (chatvla.client.lockstep), plus
    up to `jitter_ticks` more drawn per answer (seeded by `robot_id`); None runs on wall time, as a
    real arm does."""
    import time
    import zlib

    profile = robot.profile
    # On simulated time a slow answer is waited for, not refused as late.
    deadline = {"deadline_ms": LOCKSTEP_DEADLINE_MS} if latency_ticks is not None else {}
    client = GrpcPolicyClient(
        ClientConfig(addresses=tuple(addresses), token=token, image_encoding=image_encoding, robot_id=robot_id,
                     **deadline),
        SessionConfig(profile=profile, instruction=instruction,
                      max_in_flight=(executor_config or ExecutorConfig()).max_in_flight),
    )
    connection: PolicyConnection = client
    clock: Clock | None = None
    if latency_ticks is not None:
        clock = SimClock()
        connection = LockstepConnection(client, clock, profile.dt, latency_ticks, jitter_ticks=jitter_ticks,
                                        seed=zlib.crc32(robot_id.encode()))
    client.start()
    try:
        client.wait_connected(connect_timeout_s)
        loop = ControlLoop(robot, connection, ChunkExecutor(profile, executor_config),
                           SafetyFilter(profile, safety_config), clock=clock, observers=list(observers),
                           instruction=instruction, reasoning_override=reasoning_override)
        if on_loop is not None:
            on_loop(loop)
        t0 = time.monotonic()
        loop.run(max_ticks=max_ticks)
        seconds = time.monotonic() - t0
    finally:
        client.close()
    ok = success() if success is not None else None
    return EpisodeResult(ticks=loop.stats.ticks, seconds=seconds, success=ok, summary=loop.summary())


def episode_path(directory: str | Path, robot_name: str, index: int) -> Path:
    return Path(directory) / f"{robot_name}-ep{index:03d}.chatvla"
