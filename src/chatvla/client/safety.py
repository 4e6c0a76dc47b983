"""The last gate before the robot: every command passes the profile's envelope, and a watchdog decides
when the policy has been silent too long to keep moving.

Why a separate filter rather than checks inside the executor: the executor trusts the chunks it merges
(it only reasons about time), the robot adapters trust what they are given. This module trusts neither,
so a bad chunk, a bug in blending or a dead server all end in the same few, counted, logged outcomes:
command a clipped action, hold the last safe command, or stop.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from enum import Enum

import numpy as np

from chatvla.profiles import RobotProfile

log = logging.getLogger(__name__)


class Verdict(str, Enum):
    COMMAND = "command"  # send `action` (possibly clipped)
    HOLD = "hold"  # re-send `action` (the last safe command) or, if None, call robot.hold()
    STOP = "stop"  # call robot.stop()


# Intervention names, used as counter keys and in logs.
NONFINITE = "nonfinite"
JOINT_LIMIT = "joint_limit"
GRIPPER_RANGE = "gripper_range"
STEP_LIMIT = "step_limit"
STALL_HOLD = "stall_hold"
WATCHDOG_HOLD = "watchdog_hold"
WATCHDOG_STOP = "watchdog_stop"
INTERVENTIONS: tuple[str, ...] = (
    NONFINITE,
    JOINT_LIMIT,
    GRIPPER_RANGE,
    STEP_LIMIT,
    STALL_HOLD,
    WATCHDOG_HOLD,
    WATCHDOG_STOP,
)


@dataclass(frozen=True)
class SafetyConfig:
    """Watchdog thresholds in milliseconds; None derives them from the profile's chunk duration.

    Hold defaults to one chunk: a healthy executor always has a fresh chunk within that time, so the
    watchdog only fires when the policy is really gone (or the executor misbehaves). Stop defaults to
    three chunks: long enough for a failover to another replica or a brief network loss, but *not*,
    as measured, for a restart of the server the robot is on.

    Measured (scripts/measure_restart.py, `nice -n 19`, torch engine with the tiny model, franka_joint:
    hold after 1.07 s, stop after 3.20 s; a 2-core machine shared with a CPU training job; 12 restarts):
    SIGKILL -> the new process SERVING took 3.9 to 12.1 s (median 11.6 s: Python and torch imports,
    model load, warm-up). The client's readiness watch (chatvla.client.readiness) had the session back
    0.00-0.01 s after SERVING, where the blind backoff took 0.08-3.6 s; the first fresh chunk came
    18-19 s after the kill (the new session decodes fresh reasoning). So a single-server restart ends
    in STOP here, whatever the reconnect does; the watch only removes up to a backoff step (5 s at the
    cap) of extra standstill. To ride out restarts without a stop, run a second replica (the client
    fails over to it at once) or raise `stop_after_ms` above the restart time plus a first chunk,
    knowing the arm then holds that long."""

    hold_after_ms: float | None = None
    stop_after_ms: float | None = None
    # Scale the profile's per-tick step limit (e.g. 0.5 for a first run on a new robot).
    step_scale: float = 1.0
    # Seed the step limiter from the measured state when action and state are the same quantities,
    # so the first command (and the first after a stop) cannot jump from wherever the arm is.
    reference_from_state: bool = True

    def __post_init__(self) -> None:
        if self.step_scale <= 0:
            raise ValueError("step_scale must be positive")
        if (
            self.hold_after_ms is not None
            and self.stop_after_ms is not None
            and self.stop_after_ms < self.hold_after_ms
        ):
            raise ValueError("stop_after_ms must be >= hold_after_ms")


@dataclass(frozen=True)
class SafetyDecision:
    verdict: Verdict
    action: np.ndarray | None
    interventions: tuple[str, ...] = ()


class SafetyFilter:
    """Stateful filter for one robot. Call `filter` once per control tick; not thread-safe."""

    def __init__(self, profile: RobotProfile, config: SafetyConfig | None = None) -> None:
        self.profile = profile
        self.config = config or SafetyConfig()
        c = self.config
        chunk_ms = profile.chunk_duration_s * 1000.0
        self.hold_after_s = (chunk_ms if c.hold_after_ms is None else c.hold_after_ms) / 1000.0
        stop_ms = 3 * chunk_ms if c.stop_after_ms is None else c.stop_after_ms
        self.stop_after_s = max(stop_ms / 1000.0, self.hold_after_s)
        self._lower = np.asarray(profile.action_lower, dtype=np.float64)
        self._upper = np.asarray(profile.action_upper, dtype=np.float64)
        self._step = np.asarray(profile.max_step, dtype=np.float64) * c.step_scale
        self._gripper = np.zeros(profile.action_dim, dtype=bool)
        self._gripper[list(profile.gripper_indices)] = True
        self._state_is_action = profile.action_names == profile.state_names
        self.counts: Counter[str] = Counter()
        self._last_safe: np.ndarray | None = None
        self._last_fresh: float | None = None
        self._armed_at: float | None = None
        self._mode = Verdict.COMMAND
        self._active: frozenset[str] = frozenset()  # interventions of the previous tick

    @property
    def last_safe(self) -> np.ndarray | None:
        return None if self._last_safe is None else self._last_safe.copy()

    @property
    def mode(self) -> Verdict:
        """The watchdog's current state: COMMAND (policy alive), HOLD or STOP."""
        return self._mode

    def reset(self, now: float, reference: np.ndarray | None = None) -> None:
        """Start (or restart) a run: the watchdog counts from `now`; `reference` is the pose the first
        command is step-limited against (typically the measured state)."""
        self._armed_at = now
        self._last_fresh = None
        self._mode = Verdict.COMMAND
        self._last_safe = None
        if reference is not None:
            self._set_reference(reference)

    def note_fresh_chunk(self, now: float) -> None:
        """A chunk that changes the plan arrived: the policy is alive."""
        self._last_fresh = now

    def silent_for(self, now: float) -> float:
        since = self._last_fresh if self._last_fresh is not None else self._armed_at
        return 0.0 if since is None else now - since

    def filter(self, proposed: np.ndarray | None, now: float, state: np.ndarray | None = None) -> SafetyDecision:
        """Decide what the robot does this tick. `proposed` is the executor's action (None = stall);
        `state` the measured state, used to re-seed the step limiter after a stop."""
        if self._armed_at is None:
            self.reset(now)
        silent = self.silent_for(now)
        if silent > self.stop_after_s:
            return self._watchdog(Verdict.STOP, WATCHDOG_STOP, silent)
        if silent > self.hold_after_s:
            return self._watchdog(Verdict.HOLD, WATCHDOG_HOLD, silent)
        if self._mode is not Verdict.COMMAND:
            log.warning("watchdog: policy is back after %s, resuming", self._mode.value)
            if self._mode is Verdict.STOP and state is not None:
                self._set_reference(state)  # the arm may have settled elsewhere while stopped
            self._mode = Verdict.COMMAND
        if proposed is None:
            return self._hold(STALL_HOLD)
        a = np.asarray(proposed, dtype=np.float64)
        if a.shape != (self.profile.action_dim,) or not np.isfinite(a).all():
            return self._hold(NONFINITE, detail=f"shape {list(a.shape)}, finite={bool(np.isfinite(a).all())}")
        if self._last_safe is None and state is not None:
            self._set_reference(state)

        hit: list[str] = []
        clipped = np.clip(a, self._lower, self._upper)
        changed = clipped != a
        if (changed & ~self._gripper).any():
            hit.append(JOINT_LIMIT)
        if (changed & self._gripper).any():
            hit.append(GRIPPER_RANGE)
        if self._last_safe is not None:
            # Grippers open and close in one command; everything else moves at most one step.
            lo = np.where(self._gripper, -np.inf, self._last_safe - self._step)
            hi = np.where(self._gripper, np.inf, self._last_safe + self._step)
            stepped = np.clip(clipped, lo, hi)
            if (stepped != clipped).any():
                hit.append(STEP_LIMIT)
            clipped = stepped
        self._count(hit, f"proposed {np.round(a, 4).tolist()} -> {np.round(clipped, 4).tolist()}")
        self._last_safe = clipped
        return SafetyDecision(Verdict.COMMAND, clipped.copy(), tuple(hit))

    # ---- helpers ---------------------------------------------------------------------------------
    def _set_reference(self, state: np.ndarray) -> None:
        s = np.asarray(state, dtype=np.float64)
        usable = s.shape == self._lower.shape and bool(np.isfinite(s).all())
        if self.config.reference_from_state and self._state_is_action and usable:
            self._last_safe = np.clip(s, self._lower, self._upper)

    def _hold(self, name: str, detail: str = "") -> SafetyDecision:
        self._count([name], detail)
        return SafetyDecision(Verdict.HOLD, self.last_safe, (name,))

    def _watchdog(self, verdict: Verdict, name: str, silent: float) -> SafetyDecision:
        if self._mode is not verdict:
            log.warning("watchdog: no fresh chunk for %.0f ms -> %s", silent * 1000, verdict.value)
            self._mode = verdict
        self.counts[name] += 1
        self._active = frozenset((name,))
        if verdict is Verdict.STOP:
            return SafetyDecision(Verdict.STOP, None, (name,))
        return SafetyDecision(Verdict.HOLD, self.last_safe, (name,))

    def _count(self, names: list[str], detail: str) -> None:
        """Count every intervention; log the first tick of a streak at WARNING and the rest at DEBUG,
        so a long stall or a long clipped stretch is one line, not one per tick."""
        for name in names:
            self.counts[name] += 1
            level = logging.DEBUG if name in self._active else logging.WARNING
            log.log(level, "safety: %s (#%d) %s", name, self.counts[name], detail)
        self._active = frozenset(names)
