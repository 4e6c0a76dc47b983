"""Franka Panda / FER through panda-python (`pip install 'chatvla-serve[panda]'`).

panda-python bundles libfranka 0.9, the last series that speaks to Panda/FER system images; the FR3
needs the franky adapter. panda-python runs its own 1 kHz torque loop in C++: we start one of its
controllers once and hand it a new target per control tick (`set_control` returns at once), so the
executor's tick never waits on the robot.

The JointPosition controller is a PD law on an exponentially filtered target. The SDK default filter
(1.0, i.e. none) turns each 15 Hz target into a torque step; `filter_coeff` 0.02 per 1 kHz cycle gives
a ~50 ms time constant, which smooths those steps while lagging well under one tick of a chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from chatvla.client.robots.base import RobotError
from chatvla.client.robots.cameras import Camera
from chatvla.client.robots.franka_base import (
    DEFAULT_GRASP_FORCE,
    DEFAULT_GRIPPER_SPEED,
    FRANKA_DOF,
    FrankaRobot,
)
from chatvla.client.robots.hardware import require_sdk
from chatvla.client.robots.poses import matrix_to_quat_xyzw, quat_xyzw_to_matrix
from chatvla.profiles import FRANKA_JOINT, RobotProfile

DEFAULT_FILTER_COEFF = 0.02
SDK_MODULE = "panda_py"
EXTRA = "panda"


class PandaPyRobot(FrankaRobot):
    """Panda/FER arm (+ Franka hand) streamed through a panda-python controller.

    Joint profiles use `controllers.JointPosition` (target + velocity feed-forward); end-effector
    profiles use `controllers.CartesianImpedance`. Both start with their target at the measured state,
    which `connect()` has validated first."""

    def __init__(
        self,
        host: str,
        *,
        profile: RobotProfile = FRANKA_JOINT,
        cameras: Mapping[str, Camera] | None = None,
        gripper: bool = True,
        stiffness: Sequence[float] | None = None,
        damping: Sequence[float] | None = None,
        filter_coeff: float = DEFAULT_FILTER_COEFF,
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
        if not 0.0 < filter_coeff <= 1.0:
            raise ValueError(f"filter_coeff must be in (0, 1], got {filter_coeff}")
        self._stiffness = None if stiffness is None else np.asarray(stiffness, dtype=np.float64)
        self._damping = None if damping is None else np.asarray(damping, dtype=np.float64)
        self._filter_coeff = filter_coeff
        self._sdk = None
        self._panda = None
        self._ctrl = None
        self._q_target: np.ndarray | None = None

    def _open(self) -> None:
        self._sdk = require_sdk(SDK_MODULE, EXTRA, "panda-python (Panda/FER)")
        try:
            self._panda = self._sdk.Panda(self.host)
        except Exception as e:
            raise RobotError(
                f"cannot connect to the Panda at {self.host}: {e}. Check that FCI is enabled in Desk, the "
                "brakes are open and this PC is on the robot's network. panda-python speaks libfranka 0.9 "
                "(Panda/FER); for an FR3 use the 'franky' robot."
            ) from e
        if self._use_gripper:
            try:
                grip = self._sdk.libfranka.Gripper(self.host)
                self._start_gripper(grip, lambda: float(grip.read_once().width))
            except Exception as e:
                raise RobotError(
                    f"cannot connect to the Franka hand at {self.host}: {e} (gripper=False to run without)"
                ) from e

    def _read_state(self) -> np.ndarray:
        panda = self._panda
        try:
            panda.raise_error()  # controller errors do not propagate by themselves
            if self.is_ee:
                t = np.eye(4)
                t[:3, :3] = quat_xyzw_to_matrix(panda.get_orientation())
                t[:3, 3] = panda.get_position()
                arm = t
            else:
                arm = np.asarray(panda.q, dtype=np.float64)
        except Exception as e:
            raise RobotError(f"Panda at {self.host} reports an error: {e}") from e
        return self._compose_state(arm)

    def _start(self, state: np.ndarray) -> None:
        ctrls = self._sdk.controllers
        kwargs: dict[str, object] = {"filter_coeff": self._filter_coeff}
        if self.is_ee:
            self._ctrl = ctrls.CartesianImpedance(**kwargs)
        else:
            if self._stiffness is not None:
                kwargs["stiffness"] = self._stiffness
            if self._damping is not None:
                kwargs["damping"] = self._damping
            self._ctrl = ctrls.JointPosition(**kwargs)
            self._q_target = state[:FRANKA_DOF].copy()
        try:
            self._panda.start_controller(self._ctrl)
        except Exception as e:
            raise RobotError(f"Panda at {self.host} refused to start the controller: {e}") from e

    def _send(self, action: np.ndarray) -> None:
        target, width = self._split(action)
        try:
            if self.is_ee:
                self._ctrl.set_control(target[:3, 3], matrix_to_quat_xyzw(target[:3, :3]))
            else:
                prev = self._q_target if self._q_target is not None else target
                dq = (target - prev) * self._profile.control_rate_hz
                self._ctrl.set_control(target, dq)
                self._q_target = target
        except Exception as e:
            raise RobotError(f"Panda at {self.host} rejected the command: {e}") from e
        self._send_gripper(width)

    def _hold(self) -> None:
        """Keep the last target with zero velocity feed-forward: a lingering feed-forward would make
        the PD law settle off target."""
        if not self.is_ee and self._q_target is not None:
            self._ctrl.set_control(self._q_target, np.zeros(FRANKA_DOF))

    def _stop(self) -> None:
        """Re-target the measured pose so the impedance brings the arm to rest where it is. The hand is
        left alone: opening it would drop what it holds."""
        state = self._read_state()  # not limit-checked: stopping must work near the limits too
        if not np.isfinite(state).all():
            raise RobotError(f"Panda at {self.host}: no finite state to stop at")
        if self.is_ee:
            panda = self._panda
            self._ctrl.set_control(np.asarray(panda.get_position()), np.asarray(panda.get_orientation()))
        else:
            self._q_target = state[:FRANKA_DOF].copy()
            self._ctrl.set_control(self._q_target, np.zeros(FRANKA_DOF))

    def _release(self) -> None:
        try:
            if self._panda is not None and self._ctrl is not None:
                self._panda.stop_controller()
        finally:
            self._close_gripper_worker()
            self._ctrl = None
            self._panda = None
