"""Franka Research 3 through franky (`pip install 'chatvla-serve[franky]'`).

The PyPI franky-control wheels bundle libfranka 0.21, i.e. FR3 only (Panda/FER: the panda_py adapter).
franky runs libfranka's 1 kHz loop in C++ and plans with Ruckig: each control tick we hand it an
asynchronous motion to the newest target, which preempts the previous one and is re-planned from the
current velocity, so a 15 Hz target stream becomes a smooth, jerk-limited trajectory and `command()`
returns in well under a millisecond. Motions are built with `return_when_finished=False`: between
targets, and on hold, the arm keeps the last target actively instead of the motion ending.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from chatvla.client.robots.base import RobotError
from chatvla.client.robots.cameras import Camera
from chatvla.client.robots.franka_base import DEFAULT_GRASP_FORCE, DEFAULT_GRIPPER_SPEED, FrankaRobot
from chatvla.client.robots.hardware import require_sdk
from chatvla.profiles import FRANKA_JOINT, RobotProfile

SDK_MODULE = "franky"
EXTRA = "franky"
# Scales Ruckig's velocity/acceleration/jerk limits. The safety filter already caps a tick's step at
# half the velocity limit; 0.5 keeps the planner's limits consistent with that.
DEFAULT_DYNAMICS_FACTOR = 0.5
# close() waits this long (s) for the stop motion; it is not on the control path.
STOP_JOIN_S = 2.0


class FrankyRobot(FrankaRobot):
    """FR3 arm (+ Franka hand) streamed with preempting asynchronous franky motions."""

    def __init__(
        self,
        host: str,
        *,
        profile: RobotProfile = FRANKA_JOINT,
        cameras: Mapping[str, Camera] | None = None,
        gripper: bool = True,
        realtime: bool = True,
        relative_dynamics_factor: float = DEFAULT_DYNAMICS_FACTOR,
        recover_errors: bool = False,
        gripper_speed: float = DEFAULT_GRIPPER_SPEED,
        grasp_force: float = DEFAULT_GRASP_FORCE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            host,
            profile,
            cameras,
            gripper=gripper,
            gripper_speed=gripper_speed,
            grasp_force=grasp_force,
            clock=clock,
        )
        if not 0.0 < relative_dynamics_factor <= 1.0:
            raise ValueError(f"relative_dynamics_factor must be in (0, 1], got {relative_dynamics_factor}")
        self._realtime = realtime
        self._dynamics = relative_dynamics_factor
        self._recover = recover_errors
        self._sdk = None
        self._robot = None
        self._moving = False

    def _open(self) -> None:
        fr = self._sdk = require_sdk(
            SDK_MODULE,
            EXTRA,
            "franky-control (FR3)",
            hint="franky-control wheels need glibc >= 2.34 (Ubuntu 22.04 or newer)",
        )
        rt = fr.RealtimeConfig.Enforce if self._realtime else fr.RealtimeConfig.Ignore
        try:
            self._robot = fr.Robot(self.host, realtime_config=rt, relative_dynamics_factor=self._dynamics)
        except Exception as e:
            hint = (
                " No realtime kernel? Pass realtime=False (or install a PREEMPT_RT kernel)."
                if "realtime" in str(e).lower()
                else " Check that FCI is enabled in Desk, the brakes are open and this PC is on the robot's network."
            )
            raise RobotError(f"cannot connect to the FR3 at {self.host}: {e}.{hint}") from e
        if self._robot.has_errors:
            if not self._recover:
                raise RobotError(
                    f"FR3 at {self.host} is in an error state; clear it in Desk or pass recover_errors=True"
                )
            self._robot.recover_from_errors()
        if self._use_gripper:
            try:
                grip = fr.Gripper(self.host)
                self._start_gripper(grip, lambda: float(grip.width))
            except Exception as e:
                raise RobotError(
                    f"cannot connect to the Franka hand at {self.host}: {e} (gripper=False to run without)"
                ) from e

    def _read_state(self) -> np.ndarray:
        robot = self._robot
        try:
            robot.poll_motion()  # re-raises an error of the running asynchronous motion, if any
            if self.is_ee:
                arm = np.asarray(robot.current_cartesian_state.pose.end_effector_pose.matrix, dtype=np.float64)
            else:
                arm = np.asarray(robot.current_joint_state.position, dtype=np.float64)
        except Exception as e:
            raise RobotError(f"FR3 at {self.host}: {e}") from e
        return self._compose_state(arm)

    def _send(self, action: np.ndarray) -> None:
        fr = self._sdk
        target, width = self._split(action)
        if self.is_ee:
            motion = fr.CartesianMotion(fr.CartesianState(fr.RobotPose(fr.Affine(target))), return_when_finished=False)
        else:
            motion = fr.JointMotion(fr.JointState(target), return_when_finished=False)
        try:
            self._robot.move(motion, asynchronous=True)
        except Exception as e:
            raise RobotError(f"FR3 at {self.host} rejected the motion: {e}") from e
        self._moving = True
        self._send_gripper(width)

    def _hold(self) -> None:
        """Nothing to send: the last motion keeps its target (return_when_finished=False), and before
        any command the robot is idle where it stands."""

    def _stop(self) -> None:
        """Decelerate along the current path with a stop motion of the running control type."""
        if not self._moving:
            return
        fr = self._sdk
        motion = fr.CartesianStopMotion() if self.is_ee else fr.JointStopMotion()
        try:
            self._robot.move(motion, asynchronous=True)
        except Exception as e:
            raise RobotError(f"FR3 at {self.host} refused to stop: {e}") from e
        self._moving = False

    def _release(self) -> None:
        try:
            if self._robot is not None:
                self._robot.join_motion(STOP_JOIN_S)
        except Exception:  # a failed last motion must not keep the connection open
            pass
        finally:
            self._close_gripper_worker()
            self._robot = None
