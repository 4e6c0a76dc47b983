"""The two simulated rigs: which arm model, where it stands, where its cameras are, how an action
vector maps onto actuators. One frozen description per robot profile, so the scene builder, the
`SimRobot` and the oracle read the same facts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_JOINT, RobotProfile

PHYSICS_DT = 0.002  # nominal; each rig rounds it so a whole number of steps fills one control tick


@dataclass(frozen=True)
class ArmMount:
    """One arm: its name prefix in the scene and its base pose on the table (world frame)."""

    prefix: str
    pos: tuple[float, float, float]
    yaw: float = 0.0


@dataclass(frozen=True)
class WorldCamera:
    """A camera fixed in the world, aimed at `target`; `up` picks the image's up direction."""

    name: str
    pos: tuple[float, float, float]
    target: tuple[float, float, float]
    up: tuple[float, float, float] = (0.0, 0.0, 1.0)
    fovy: float = 58.0


@dataclass(frozen=True)
class Rig:
    """Everything about a simulated embodiment that is not the task.

    Per arm, the action is `arm_joints` (radians) followed by the gripper width (metres); the gripper
    actuator takes half the width (one finger's travel). `tcp_approach_axis`/`tcp_closing_axis` name the
    axes of the tcp site frame that point along the fingers and along the closing direction; the oracle
    uses them to build top-down grasps for either arm model.
    """

    name: str
    profile: RobotProfile
    arm_xml: str  # relative to the assets folder
    mounts: tuple[ArmMount, ...]
    arm_joints: tuple[str, ...]
    gripper_joint: str
    gripper_actuator: str
    tcp_site: str
    tcp_approach_axis: int
    tcp_closing_axis: int
    pad_half_height: float  # how far the finger pads reach past the tcp, so grasps stay clear of the table
    cameras: dict[str, str]  # profile camera name -> scene camera name
    world_cameras: tuple[WorldCamera, ...]
    task_origin: tuple[float, float]  # world xy of the task frame's origin (on the table top)
    table_center: tuple[float, float]
    table_half: tuple[float, float]
    reset_q: tuple[float, ...]  # the pose an episode starts in (an action vector)

    @property
    def n_substeps(self) -> int:
        return max(1, math.ceil(self.profile.dt / PHYSICS_DT - 1e-9))

    @property
    def timestep(self) -> float:
        return self.profile.dt / self.n_substeps

    @property
    def arm_dim(self) -> int:
        return len(self.arm_joints) + 1

    def arm_xml_path(self) -> Path:
        return Path(str(resources.files("chatvla.client.sim") / "assets" / self.arm_xml))


PANDA_RIG = Rig(
    name="panda_table",
    profile=FRANKA_JOINT,
    arm_xml="panda/panda.xml",
    mounts=(ArmMount("panda/", (0.0, 0.0, 0.0)),),
    arm_joints=tuple(f"joint{i}" for i in range(1, 8)),
    gripper_joint="finger_joint1",
    gripper_actuator="gripper",
    tcp_site="tcp",
    tcp_approach_axis=2,
    tcp_closing_axis=0,
    pad_half_height=0.011,
    cameras={"front": "front", "wrist": "panda/wrist"},
    # From the robot's left, beside the arm, the way DROID-style exterior cameras look at the table: it
    # sees the whiteboard, the cards and the gripper without the arm hiding the workspace.
    world_cameras=(WorldCamera("front", pos=(0.25, 0.45, 0.45), target=(0.62, -0.05, 0.05), fovy=58.0),),
    task_origin=(0.5, 0.0),
    table_center=(0.45, 0.0),
    table_half=(0.7, 0.75),
    reset_q=FRANKA_JOINT.home,
)

# ARX arms side by side at the near edge of the table, facing +x, like the ARX R5 bimanual rigs.
_ARX_READY = (0.0, 1.0, 1.1, -0.6, 0.0, 0.0, 0.088)
ARX_RIG = Rig(
    name="arx5_bimanual_table",
    profile=ARX_R5_BIMANUAL,
    arm_xml="arx5/arx5.xml",
    mounts=(ArmMount("left/", (0.0, 0.22, 0.0)), ArmMount("right/", (0.0, -0.22, 0.0))),
    arm_joints=tuple(f"joint{i}" for i in range(1, 7)),
    gripper_joint="finger_left",
    gripper_actuator="gripper",
    tcp_site="tcp",
    tcp_approach_axis=0,
    tcp_closing_axis=1,
    pad_half_height=0.015,
    cameras={"cam_top": "cam_top", "cam_left_wrist": "left/wrist", "cam_right_wrist": "right/wrist"},
    # High between the two arms looking down and forward (like ALOHA's cam_high): the whiteboard, the
    # table and both grippers are in view, and card digits read upright.
    world_cameras=(WorldCamera("cam_top", pos=(0.05, 0.0, 0.65), target=(0.37, 0.0, 0.0), fovy=62.0),),
    task_origin=(0.30, 0.0),
    table_center=(0.3, 0.0),
    table_half=(0.55, 0.7),
    reset_q=_ARX_READY * 2,
)

RIGS: dict[str, Rig] = {PANDA_RIG.profile.name: PANDA_RIG, ARX_RIG.profile.name: ARX_RIG}


def get_rig(profile_name: str) -> Rig:
    """The rig that simulates a robot profile."""
    try:
        return RIGS[profile_name]
    except KeyError:
        raise KeyError(f"no simulated rig for profile {profile_name!r}; have: {', '.join(sorted(RIGS))}") from None
