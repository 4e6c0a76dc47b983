"""Stand-ins for a robot, a clock and a policy server, for tests, benchmarks and dry runs.

They run on a `FakeClock`, so a scripted latency of 300 ms costs no real time and every run is
repeatable: the only thing that moves time is the control loop sleeping until its next tick.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from chatvla.client.connection import (
    ChunkReply,
    ObservationRequest,
    PolicyConnection,
    PolicyError,
    PolicyEvent,
    RequestFailed,
    Unavailable,
)
from chatvla.client.lockstep import SimClock
from chatvla.client.robots.base import Robot, RobotError, RobotObservation
from chatvla.profiles import RobotProfile


class FakeClock(SimClock):
    """Time that only moves when told to. `sleep_until` jumps, so a loop of N ticks runs instantly (the
    simulated time `chatvla eval` runs sim robots on)."""


class FakeRobot(Robot):
    """A robot whose joints reach each commanded target within the tick (times `tracking`). It records
    the target of every tick (`targets`), which is the trajectory the benchmark measures jerk on."""

    def __init__(
        self,
        profile: RobotProfile,
        *,
        clock: FakeClock | None = None,
        state: np.ndarray | None = None,
        tracking: float = 1.0,
        image_size: tuple[int, int] | None = (8, 8),
    ) -> None:
        self._profile = profile
        self._clock = clock
        if state is None:
            state = np.asarray(profile.home or np.zeros(profile.state_dim), dtype=np.float64)
        self.state = np.asarray(state, dtype=np.float64).copy()
        self.tracking = tracking
        self._images = {
            c.name: np.zeros((*(image_size or (c.height, c.width)), 3), dtype=np.uint8) for c in profile.cameras
        }
        self.targets: list[np.ndarray] = []
        self.commands = 0
        self.holds = 0
        self.stops = 0
        self.fail_observe: str | None = None  # set to a message to make observe() raise RobotError

    @property
    def profile(self) -> RobotProfile:
        return self._profile

    def observe(self) -> RobotObservation:
        if self.fail_observe:
            raise RobotError(self.fail_observe)
        t = self._clock.now() if self._clock is not None else 0.0
        return RobotObservation(images=dict(self._images), state=self.state.astype(np.float32), timestamp=t)

    def command(self, action: np.ndarray) -> None:
        a = np.asarray(action, dtype=np.float64)
        self.commands += 1
        self.targets.append(a.copy())
        self.state = self.state + self.tracking * (a - self.state)

    def hold(self) -> None:
        self.holds += 1
        self.targets.append(self.state.copy())

    def stop(self) -> None:
        self.stops += 1
        self.targets.append(self.state.copy())


Latency = Callable[[int, ObservationRequest], "float | None"]


@dataclass
class _Scheduled:
    due: float
    order: int
    event: PolicyEvent


class FakePolicyConnection(PolicyConnection):
    """A policy server with scripted latency, loss and errors, driven by a FakeClock.

    `latency(seq, request)` returns the round trip in seconds, or None to lose the request (no reply,
    no error: only the executor's timeout notices). `errors(seq, request)` may return a PolicyError to
    answer with instead of a chunk. The chunk is computed from the observation when it is submitted,
    as a server would, and becomes visible to `poll` once its round trip has elapsed. A request's
    reasoning override comes back as the chunk's reasoning (not refreshed), as from a real server."""

    def __init__(
        self,
        clock: FakeClock,
        policy: Callable[[ObservationRequest], np.ndarray],
        latency: float | Latency = 0.0,
        errors: Callable[[int, ObservationRequest], PolicyError | None] | None = None,
    ) -> None:
        self.clock = clock
        self.policy = policy
        self.latency: Latency = latency if callable(latency) else (lambda _s, _r, v=float(latency): v)
        self.errors = errors
        self.available = True
        self.requests: list[ObservationRequest] = []
        self.lost: list[int] = []
        self._seq = 0
        self._order = 0
        self._scheduled: list[_Scheduled] = []

    def set_available(self, up: bool) -> None:
        """Kill (False) or revive (True) the server. Killing fails everything in flight, as a real
        client does when its stream breaks."""
        self.available = up
        if not up:
            now = self.clock.now()
            for s in self._scheduled:
                if isinstance(s.event, ChunkReply):
                    s.event = RequestFailed(s.event.seq, Unavailable("server went away"), now)
                    s.due = now

    def submit(self, request: ObservationRequest) -> int:
        self._seq += 1
        seq = self._seq
        self.requests.append(request)
        now = self.clock.now()
        if not self.available:
            self._schedule(now, RequestFailed(seq, Unavailable("server unavailable"), now))
            return seq
        lat = self.latency(seq, request)
        if lat is None:
            self.lost.append(seq)
            return seq
        err = self.errors(seq, request) if self.errors else None
        if err is not None:
            err.seq = seq
            self._schedule(now + lat, RequestFailed(seq, err, now + lat))
        else:
            actions = np.asarray(self.policy(request), dtype=np.float32)
            # Like the server: a supplied reasoning override is echoed and nothing was decoded.
            reply = ChunkReply(seq, request.tick, actions, received_at=now + lat, reasoning=request.reasoning or "")
            self._schedule(now + lat, reply)
        return seq

    def _schedule(self, due: float, event: PolicyEvent) -> None:
        self._order += 1
        self._scheduled.append(_Scheduled(due, self._order, event))

    def poll(self) -> list[PolicyEvent]:
        now = self.clock.now() + 1e-9
        ready = sorted((s for s in self._scheduled if s.due <= now), key=lambda s: (s.due, s.order))
        self._scheduled = [s for s in self._scheduled if s.due > now]
        return [s.event for s in ready]


class TrackingPolicy:
    """A policy whose chunk is a smooth function of the observation, so jerk measurements mean something.

    It plans from the observed state back onto a smooth reference motion (sinusoids around the home
    pose, one period per joint): `chunk[i] = r(t + i) + (s - r(t)) * decay**i`. `noise` adds a random
    constant offset per chunk, like two diffusion samples that disagree slightly, so how chunks are
    joined shows up in the trajectory."""

    def __init__(
        self,
        profile: RobotProfile,
        *,
        amplitude: float = 0.25,
        period_s: float = 5.0,
        decay: float = 0.6,
        noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.profile = profile
        self.amplitude = amplitude
        self.decay = decay
        self.noise = noise
        self._rng = np.random.default_rng(seed)
        d = profile.action_dim
        self.center = np.asarray(
            profile.home or (np.add(profile.action_lower, profile.action_upper) / 2), dtype=np.float64
        )
        self._moving = np.ones(d, dtype=bool)
        self._moving[list(profile.gripper_indices)] = False
        # Periods between 1x and 2x `period_s` so the joints do not move in lockstep.
        self._omega = 2 * np.pi / (period_s * profile.control_rate_hz * (1 + np.arange(d) / max(1, d - 1)))
        self._phase = np.linspace(0, np.pi, d)

    def reference(self, ticks: np.ndarray) -> np.ndarray:
        t = np.asarray(ticks, dtype=np.float64)[:, None]
        wave = self.amplitude * (np.sin(self._omega * t + self._phase) - np.sin(self._phase))
        return self.center + np.where(self._moving, wave, 0.0)

    def __call__(self, request: ObservationRequest) -> np.ndarray:
        h = self.profile.chunk_size
        ref = self.reference(request.tick + np.arange(h))
        s = np.asarray(request.state, dtype=np.float64)
        pull = (s - ref[0])[None, :] * (self.decay ** np.arange(h))[:, None]
        chunk = ref + pull
        if self.noise:
            chunk = chunk + np.where(self._moving, self._rng.normal(0, self.noise, self.profile.action_dim), 0)
        return chunk
