"""ARX R5 bimanual rig through the vendor's arx-r5-sdk (`pip install 'chatvla-serve[arx]'`).

The SDK does not fail when no arm answers: constructed on a CAN port that does not exist it prints
"Unable to create a CAN socket", thousands of "Socket not open" lines and "motors offline", then
returns, and `get_joint_positions()` reports zeros. Driving on that would send the arm from wherever it
really is to the all-zero pose. So this adapter
  1. checks each CAN interface in sysfs (present and administratively up) before the SDK is touched,
  2. after connecting, reads each arm several times and refuses an arm whose joints all read exactly
     zero (a powered arm's encoders never report six exact zeros; a dead bus always does),
  3. keeps checking the interface and the zero signature on every observe, so a bus that drops
     mid-run stops the episode instead of steering on stale zeros.

Each arm takes `set_joint_positions` (6 joints) and `set_catch_pos` (gripper) per tick; the SDK's own
loop (cfg dt, 20 Hz by default) interpolates, so both calls return at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from chatvla.client.robots.base import RobotError
from chatvla.client.robots.cameras import Camera
from chatvla.client.robots.hardware import HardwareRobot, require_sdk
from chatvla.profiles import ARX_R5_BIMANUAL, RobotProfile

SDK_MODULE = "arx_r5_sdk"
EXTRA = "arx"
ARM_JOINTS = 6
ARM_DIMS = ARM_JOINTS + 1  # joints + gripper, per arm, in profile order
SYSFS_NET = "/sys/class/net"
IFF_UP = 0x1
# Gripper: the profile speaks metres (0..0.088 open); set_catch_pos takes the SDK's own units, where
# ARX's examples use 0..5 for fully open. Check against your unit and pass gripper_sdk_max if it differs.
DEFAULT_GRIPPER_SDK_MAX = 5.0
# Zero-state probe at connect: this many reads, this far apart (s).
ZERO_PROBE_READS = 3
ZERO_PROBE_INTERVAL_S = 0.02
_SDK_HINT = (
    "arx-r5-sdk needs: apt-get install liborocos-kdl1.5 libkdl-parser1d (plus a libkdl_parser.so symlink "
    "or libkdl-parser-dev), and LD_LIBRARY_PATH=<site-packages>/arx_r5_sdk/lib; see docs/robots.md"
)


@dataclass(frozen=True)
class ArxArm:
    """One arm of the rig: its name in messages, its CAN interface, and its slice of the action."""

    name: str
    can_port: str


def check_can_interface(iface: str, sysfs_net: str = SYSFS_NET) -> None:
    """RobotError unless `iface` exists and is up. Checked before the SDK is constructed, because the
    SDK would otherwise spend seconds failing quietly and then report zeros."""
    path = os.path.join(sysfs_net, iface)
    if not os.path.isdir(path):
        present = sorted(os.listdir(sysfs_net)) if os.path.isdir(sysfs_net) else []
        cans = [n for n in present if n.startswith(("can", "slcan", "vcan"))]
        raise RobotError(
            f"CAN interface {iface!r} not found in {sysfs_net} (CAN interfaces present: {cans or 'none'}). "
            "Is the USB-CAN adapter plugged in and its driver loaded?"
        )
    try:
        with open(os.path.join(path, "flags")) as f:
            flags = int(f.read().strip(), 16)
    except (OSError, ValueError) as e:
        raise RobotError(f"cannot read the state of CAN interface {iface!r}: {e}") from e
    if not flags & IFF_UP:
        raise RobotError(f"CAN interface {iface!r} is down: sudo ip link set {iface} up type can bitrate 1000000")


def is_zero_state(joints: np.ndarray) -> bool:
    """The dead-bus signature: every joint exactly 0.0."""
    return bool(np.all(np.asarray(joints) == 0.0))


class ArxR5Robot(HardwareRobot):
    """Two ARX R5 arms (left then right, 7 dims each) as one `arx_r5_bimanual` robot."""

    def __init__(
        self,
        left_can: str = "can0",
        right_can: str = "can1",
        *,
        profile: RobotProfile = ARX_R5_BIMANUAL,
        cameras: Mapping[str, Camera] | None = None,
        arm_type: int = 0,
        sdk_dt: float | None = None,
        gripper_sdk_max: float = DEFAULT_GRIPPER_SDK_MAX,
        sysfs_net: str = SYSFS_NET,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        arms = (ArxArm("left", left_can), ArxArm("right", right_can))
        if profile.action_dim != ARM_DIMS * len(arms) or profile.state_dim != profile.action_dim:
            raise RobotError(
                f"profile {profile.name} has {profile.action_dim} dims; an ARX R5 pair needs {ARM_DIMS * len(arms)}"
            )
        grippers = tuple(ARM_DIMS * i + ARM_JOINTS for i in range(len(arms)))
        if profile.gripper_indices != grippers:
            raise RobotError(f"profile {profile.name}: ARX grippers must be at indices {grippers}")
        if left_can == right_can:
            raise RobotError(f"both arms are on {left_can!r}; each R5 arm needs its own CAN interface")
        super().__init__(profile, cameras, clock=clock)
        self.arms: tuple[ArxArm, ...] = arms
        self._arm_type = arm_type
        self._sdk_dt = sdk_dt
        self._gripper_scale = gripper_sdk_max / float(profile.action_upper[ARM_JOINTS])
        self._sysfs = sysfs_net
        self._sleep = sleep
        self._handles: list[object] = []

    def _source(self) -> str:
        return "ArxR5Robot(" + ", ".join(f"{a.name}={a.can_port}" for a in self.arms) + ")"

    def _open(self) -> None:
        for arm in self.arms:
            check_can_interface(arm.can_port, self._sysfs)
        sdk = require_sdk(SDK_MODULE, EXTRA, "arx-r5-sdk (ARX R5)", hint=_SDK_HINT)
        for arm in self.arms:
            cfg: dict[str, object] = {
                "can_port": arm.can_port,
                "type": self._arm_type,
                "num_joints": ARM_DIMS,
            }
            if self._sdk_dt is not None:
                cfg["dt"] = self._sdk_dt
            try:
                self._handles.append(sdk.SingleArm(cfg))
            except Exception as e:
                raise RobotError(f"ARX {arm.name} arm on {arm.can_port}: SDK failed to start: {e}") from e
        self._probe_zero_state()

    def _probe_zero_state(self) -> None:
        """Several reads, so one unlucky sample cannot pass or fail an arm by itself."""
        dead = set(range(len(self.arms)))
        for k in range(ZERO_PROBE_READS):
            if k:
                self._sleep(ZERO_PROBE_INTERVAL_S)
            for i in list(dead):
                if not is_zero_state(self._arm_joints(i)[0]):
                    dead.discard(i)
        if dead:
            names = ", ".join(f"{self.arms[i].name} ({self.arms[i].can_port})" for i in sorted(dead))
            raise RobotError(
                f"ARX arm(s) {names} report an all-zero joint state in {ZERO_PROBE_READS} reads: no motor "
                "is answering (arm unpowered, CAN cable, wrong can_port, or bitrate). "
                "Refusing to drive on zeros."
            )

    def _arm_joints(self, i: int) -> tuple[np.ndarray, float | None]:
        """(6 joint positions, gripper in profile units if the SDK reports it)."""
        arm = self.arms[i]
        try:
            raw = np.asarray(self._handles[i].get_joint_positions(), dtype=np.float64).reshape(-1)
        except Exception as e:
            raise RobotError(f"ARX {arm.name} arm on {arm.can_port}: reading joints failed: {e}") from e
        if raw.size < ARM_JOINTS:
            raise RobotError(f"ARX {arm.name} arm on {arm.can_port}: SDK returned {raw.size} joint values")
        grip = float(raw[ARM_JOINTS]) / self._gripper_scale if raw.size > ARM_JOINTS else None
        return raw[:ARM_JOINTS], grip

    def _read_state(self) -> np.ndarray:
        parts: list[np.ndarray] = []
        for i, arm in enumerate(self.arms):
            check_can_interface(arm.can_port, self._sysfs)
            joints, grip = self._arm_joints(i)
            if is_zero_state(joints):
                raise RobotError(
                    f"ARX {arm.name} arm on {arm.can_port} now reports an all-zero joint state: the bus "
                    "stopped answering. Stopping instead of driving on zeros."
                )
            if grip is None:  # SDK without gripper feedback: report what was asked (or fully open)
                sl = self._arm_slice(i)
                grip = (
                    float(self._last_command[sl][-1])
                    if self._last_command is not None
                    else float(self._profile.action_upper[sl.stop - 1])
                )
            parts.append(np.concatenate([joints, [grip]]))
        return np.concatenate(parts)

    def _arm_slice(self, i: int) -> slice:
        return slice(ARM_DIMS * i, ARM_DIMS * (i + 1))

    def _send(self, action: np.ndarray) -> None:
        for i, arm in enumerate(self.arms):
            a = action[self._arm_slice(i)]
            try:
                self._handles[i].set_joint_positions(a[:ARM_JOINTS].copy())
                self._handles[i].set_catch_pos(float(a[ARM_JOINTS]) * self._gripper_scale)
            except Exception as e:
                raise RobotError(f"ARX {arm.name} arm on {arm.can_port} rejected the command: {e}") from e

    def _hold(self) -> None:
        """The SDK loop keeps tracking the last target; nothing to send."""

    def _stop(self) -> None:
        """Freeze at the measured joints (ARX arms have no brakes: a damping or protect mode would let
        them sag). Grippers keep their last target so nothing held is dropped."""
        for i, arm in enumerate(self.arms):
            joints, _ = self._arm_joints(i)
            if is_zero_state(joints) or not np.isfinite(joints).all():
                raise RobotError(f"ARX {arm.name} arm on {arm.can_port}: no usable joint reading to stop at")
            self._handles[i].set_joint_positions(joints.copy())

    def _release(self) -> None:
        self._handles = []

    @property
    def arm_names(self) -> Sequence[str]:
        return tuple(a.name for a in self.arms)
