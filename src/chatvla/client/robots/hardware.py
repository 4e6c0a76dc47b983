"""What the real-arm adapters share: lazy SDK import, state plausibility checks, a non-blocking gripper
worker, and the connect/observe/command skeleton that refuses to drive before the state is known good.

Each adapter only supplies the SDK calls (`_open`, `_read_state`, `_start`, `_send`, `_hold`, `_stop`,
`_release`); the order of checks lives here once, so no adapter can forget one.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping
from types import ModuleType

import numpy as np

from chatvla.client.robots.base import Robot, RobotError, RobotObservation
from chatvla.client.robots.cameras import Camera, bind_cameras, capture
from chatvla.profiles import RobotProfile

log = logging.getLogger(__name__)

# A measured joint may sit this fraction of its range outside the profile limits before we call the
# reading implausible (encoders overshoot a little at the end stops; garbage is far outside).
STATE_MARGIN_FRACTION = 0.05
# An end-effector position further than this from the base (m) is not a reading of a real arm.
EE_MAX_REACH_M = 2.0
# Commands may exceed the limits by float noise only; the safety filter has already clipped them.
COMMAND_TOLERANCE = 1e-6
# Gripper targets closer than this to the last one sent are not re-sent (m).
GRIPPER_DEADBAND_M = 0.002


def require_sdk(module: str, extra: str, robot: str, hint: str = "") -> ModuleType:
    """Import an arm SDK when an adapter connects, never at package import: robot PCs install only the
    extra for their own arm, and the client must import without any of them."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        msg = (
            f"the {robot} adapter needs the '{module}' module: pip install 'chatvla-serve[{extra}]' "
            f"(import failed: {e})"
        )
        raise RobotError(msg + (f". {hint}" if hint else "")) from e


def validate_state(profile: RobotProfile, state: np.ndarray, *, source: str) -> np.ndarray:
    """Return `state` as float64 if it is a plausible reading of this embodiment, else RobotError.

    This is what stands between an SDK that reports zeros / NaN / stale garbage and the first
    command: the executor starts its trajectory from this state."""
    s = np.asarray(state, dtype=np.float64).reshape(-1)
    if s.shape != (profile.state_dim,):
        raise RobotError(f"{source}: state has {s.size} values, profile {profile.name} needs {profile.state_dim}")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        names = [profile.state_names[i] for i in bad]
        raise RobotError(f"{source}: state is not finite at {names}: {s[bad].tolist()}")
    if profile.action_space == "joint_position":
        lo = np.asarray(profile.action_lower)
        hi = np.asarray(profile.action_upper)
        margin = STATE_MARGIN_FRACTION * (hi - lo)
        out = np.flatnonzero((s < lo - margin) | (s > hi + margin))
        if out.size:
            detail = ", ".join(f"{profile.state_names[i]}={s[i]:.4f} (limits {lo[i]:.4f}..{hi[i]:.4f})" for i in out)
            raise RobotError(f"{source}: implausible state outside the profile limits: {detail}")
    else:
        if np.linalg.norm(s[:3]) > EE_MAX_REACH_M:
            raise RobotError(f"{source}: end-effector position {s[:3].tolist()} is beyond any arm's reach")
        cols = np.linalg.norm(s[3:9].reshape(2, 3), axis=1)
        if np.any(np.abs(cols - 1.0) > 0.05):
            raise RobotError(f"{source}: end-effector rotation columns are not unit vectors: {cols.tolist()}")
    return s


def check_command(profile: RobotProfile, action: np.ndarray) -> np.ndarray:
    """Last-line check of a command: right length, finite, inside the limits. The safety filter should
    make this a no-op; if it ever fires, the bug is upstream and the arm must not follow it."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.shape != (profile.action_dim,):
        raise RobotError(f"command has {a.size} values, profile {profile.name} needs {profile.action_dim}")
    if not np.isfinite(a).all():
        raise RobotError(f"command is not finite: {a.tolist()}")
    lo = np.asarray(profile.action_lower) - COMMAND_TOLERANCE
    hi = np.asarray(profile.action_upper) + COMMAND_TOLERANCE
    out = np.flatnonzero((a < lo) | (a > hi))
    if out.size:
        names = [profile.action_names[i] for i in out]
        raise RobotError(f"command outside the profile limits at {names}: {a[out].tolist()}")
    return a


class GripperWorker:
    """Drives a blocking SDK gripper from its own thread, newest target wins.

    libfranka grippers block for the whole finger motion (hundreds of ms) and run one command at a
    time; calling them from the control tick would stall the arm, and forwarding every 15 Hz target
    would queue seconds of finger motion. So targets within a deadband of the last one sent are
    dropped, and the width is read between commands and served from a cache."""

    def __init__(
        self,
        move: Callable[[float], object],
        read_width: Callable[[], float],
        *,
        name: str,
        deadband: float = GRIPPER_DEADBAND_M,
        poll_s: float = 0.05,
    ) -> None:
        self._move = move
        self._read = read_width
        self._deadband = deadband
        self._poll_s = poll_s
        self._cond = threading.Condition()
        self._target: float | None = None
        self._sent: float | None = None
        self._busy = False
        self._stop = False
        self._width = float(read_width())
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"gripper-{name}", daemon=True)
        self._thread.start()

    @property
    def width(self) -> float:
        return self._width

    def set_target(self, width: float) -> None:
        with self._cond:
            self._target = float(width)
            self._cond.notify()

    def _pending(self) -> float | None:
        t = self._target
        if t is None or (self._sent is not None and abs(t - self._sent) < self._deadband):
            return None
        return t

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._pending() is not None, timeout=self._poll_s)
                if self._stop:
                    return
                target = self._pending()
                self._busy = target is not None
                if target is not None:
                    self._sent = target
            try:
                if target is not None:
                    self._move(target)
                self._width = float(self._read())
            except Exception as e:  # the arm keeps running; the error is reported, not raised here
                self.error = e
                log.warning("gripper command failed: %s", e)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once every accepted target has been sent (tests and shutdown use this)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy and self._pending() is None, timeout=timeout)

    def close(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)


class HardwareRobot(Robot):
    """Skeleton of a real-arm adapter. Connect validates the state before anything can be commanded;
    every observe re-validates it, so an SDK that silently starts reporting garbage stops the run."""

    def __init__(
        self,
        profile: RobotProfile,
        cameras: Mapping[str, Camera] | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._profile = profile
        self._cameras = bind_cameras(profile, cameras)
        self._clock = clock
        self._connected = False
        self._closed = False
        self._last_command: np.ndarray | None = None

    @property
    def profile(self) -> RobotProfile:
        return self._profile

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def last_command(self) -> np.ndarray | None:
        return None if self._last_command is None else self._last_command.copy()

    def __enter__(self) -> HardwareRobot:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        if self._connected:
            return
        if self._closed:
            raise RobotError(f"{type(self).__name__} was closed; make a new one")
        try:
            self._open()
            state = self._checked_state()
            self._start(state)
        except BaseException:
            self._release()
            raise
        self._connected = True

    def observe(self) -> RobotObservation:
        self._require_connected()
        t = self._clock()
        state = self._checked_state()
        images = capture(self._cameras, self._profile)
        return RobotObservation(images=images, state=state.astype(np.float32), timestamp=t)

    def command(self, action: np.ndarray) -> None:
        self._require_connected()
        a = check_command(self._profile, action)
        self._send(a)
        self._last_command = a

    def hold(self) -> None:
        self._require_connected()
        self._hold()

    def stop(self) -> None:
        self._require_connected()
        self._stop()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._connected:
                self._stop()
        except Exception as e:  # closing must release the SDK even if the last stop failed
            log.warning("%s: stop on close failed: %s", type(self).__name__, e)
        finally:
            self._connected = False
            self._release()
            for cam in self._cameras.values():
                cam.close()

    def _require_connected(self) -> None:
        if not self._connected:
            raise RobotError(f"{type(self).__name__} is not connected; call connect() first")

    def _checked_state(self) -> np.ndarray:
        return validate_state(self._profile, self._read_state(), source=self._source())

    # --- SDK hooks -----------------------------------------------------------------------------------
    def _source(self) -> str:
        return type(self).__name__

    @abstractmethod
    def _open(self) -> None:
        """Import the SDK and connect; raise RobotError with an actionable message on failure."""

    @abstractmethod
    def _read_state(self) -> np.ndarray:
        """Latest state in profile order and units; must not block longer than a tick."""

    def _start(self, state: np.ndarray) -> None:
        """Start streaming control from the validated `state` (e.g. a controller whose target is it)."""

    @abstractmethod
    def _send(self, action: np.ndarray) -> None:
        """Hand the SDK the newest target; return at once (the SDK interpolates)."""

    @abstractmethod
    def _hold(self) -> None: ...

    @abstractmethod
    def _stop(self) -> None: ...

    @abstractmethod
    def _release(self) -> None:
        """Drop SDK objects; called after a failed connect too, so tolerate partial state."""


def franka_gripper_command(
    gripper: object, width: float, *, speed: float, force: float, grasp_below: float, max_width: float
) -> object:
    """Send one Franka-hand target (libfranka API, same in panda-py and franky).

    `move` fails when an object stops the fingers, and then holds no force, so a target below
    `grasp_below` becomes a force-controlled `grasp` with epsilons wide enough to count any stop as
    success: the hand keeps squeezing whatever it closed on."""
    if width < grasp_below:
        return gripper.grasp(0.0, speed, force, max_width, max_width)  # type: ignore[attr-defined]
    return gripper.move(min(width, max_width), speed)  # type: ignore[attr-defined]
