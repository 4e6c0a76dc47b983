"""What the two Franka adapters (panda-python for Panda/FER, franky for FR3) share: the profile shapes
they accept, the Franka hand on its own thread, and splitting an action into arm target and width.

The SDKs differ only in how an arm target is streamed, so that is all each adapter module contains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from chatvla.client.robots.base import RobotError
from chatvla.client.robots.cameras import Camera
from chatvla.client.robots.hardware import GripperWorker, HardwareRobot, franka_gripper_command
from chatvla.client.robots.poses import ee_action_to_transform, transform_to_ee_state
from chatvla.profiles import RobotProfile

FRANKA_DOF = 7
# Closing below this width (m) grasps with force instead of moving to a width (see franka_gripper_command).
GRASP_BELOW_M = 0.01
DEFAULT_GRIPPER_SPEED = 0.1  # m/s
DEFAULT_GRASP_FORCE = 20.0  # N


def check_franka_profile(profile: RobotProfile) -> None:
    """Franka adapters speak 7 joints + width, or xyz + rot6d + width; refuse anything else up front."""
    shapes = {"joint_position": FRANKA_DOF + 1, "ee_pose_rot6d": 10}
    want = shapes.get(profile.action_space)
    if want is None or profile.action_dim != want or profile.state_dim != want:
        raise RobotError(
            f"profile {profile.name} ({profile.action_space}, {profile.action_dim} dims) does not fit a "
            "Franka arm: use franka_joint (7 joints + gripper) or franka_ee (xyz + rot6d + gripper)"
        )
    if profile.gripper_indices != (want - 1,):
        raise RobotError(f"profile {profile.name}: a Franka profile's gripper must be its last dimension")


class FrankaRobot(HardwareRobot):
    """A Franka arm plus an optional Franka hand. Subclasses stream the arm target."""

    def __init__(
        self,
        host: str,
        profile: RobotProfile,
        cameras: Mapping[str, Camera] | None,
        *,
        gripper: bool,
        gripper_speed: float,
        grasp_force: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_franka_profile(profile)
        super().__init__(profile, cameras, clock=clock)
        self.host = host
        self._use_gripper = gripper
        self._gripper_speed = gripper_speed
        self._grasp_force = grasp_force
        self._gripper_sdk: object | None = None
        self._gripper: GripperWorker | None = None
        self._max_width = float(profile.action_upper[-1])

    @property
    def is_ee(self) -> bool:
        return self._profile.action_space == "ee_pose_rot6d"

    def _source(self) -> str:
        return f"{type(self).__name__}({self.host})"

    def _start_gripper(self, sdk_gripper: object, read_width: Callable[[], float]) -> None:
        self._gripper_sdk = sdk_gripper

        def move(width: float) -> object:
            return franka_gripper_command(
                sdk_gripper,
                width,
                speed=self._gripper_speed,
                force=self._grasp_force,
                grasp_below=GRASP_BELOW_M,
                max_width=self._max_width,
            )

        self._gripper = GripperWorker(move, read_width, name=self.host)

    def _gripper_width(self) -> float:
        """Measured width; without a hand the last commanded (or fully open) width, so the state vector
        keeps its shape and the policy sees what it asked for."""
        if self._gripper is not None:
            return self._gripper.width
        if self._last_command is not None:
            return float(self._last_command[-1])
        return self._max_width

    def _compose_state(self, arm: np.ndarray) -> np.ndarray:
        """`arm` is 7 joint positions, or a 4x4 end-effector pose for EE profiles."""
        width = self._gripper_width()
        if self.is_ee:
            return transform_to_ee_state(arm, width)
        q = np.asarray(arm, dtype=np.float64).reshape(-1)
        if q.size != FRANKA_DOF:
            raise RobotError(f"{self._source()}: SDK returned {q.size} joint values, a Franka arm has 7")
        return np.concatenate([q, [width]])

    def _split(self, action: np.ndarray) -> tuple[np.ndarray, float]:
        """Arm target (7 joints, or a 4x4 pose) and gripper width of one action."""
        if self.is_ee:
            try:
                return ee_action_to_transform(action), float(action[-1])
            except ValueError as e:
                raise RobotError(f"end-effector command has an unusable rotation: {e}") from e
        return action[:FRANKA_DOF].copy(), float(action[-1])

    def _send_gripper(self, width: float) -> None:
        if self._gripper is not None:
            self._gripper.set_target(width)

    def _close_gripper_worker(self) -> None:
        if self._gripper is not None:
            self._gripper.close()
        self._gripper = None
        self._gripper_sdk = None
