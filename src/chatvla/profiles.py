"""Robot profiles: the one place that defines each embodiment's dimensions, cameras, rates and limits.

Both sides read these: the server checks that a session's profile matches the model it hosts, the
client sizes its executor and safety filter from them. This module must stay torch-free because the
robot PC imports it.

Limits are the manufacturers' published joint ranges where we know them (Franka Panda/FR3), and
conservative placeholders where we do not (ARX R5: check against your unit's URDF before real use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ActionSpace = Literal["joint_position", "ee_pose_rot6d"]


@dataclass(frozen=True)
class CameraSpec:
    """A camera the model expects; `height`/`width` is what a client should send."""

    name: str
    height: int = 224
    width: int = 224


@dataclass(frozen=True)
class RobotProfile:
    """Shape and safety envelope of one embodiment's action and state vectors."""

    name: str
    description: str
    action_space: ActionSpace
    action_names: tuple[str, ...]
    state_names: tuple[str, ...]
    chunk_size: int
    control_rate_hz: float
    cameras: tuple[CameraSpec, ...]
    # Per-dimension bounds of a commanded action, in robot units (rad, m, or unitless for rot6d).
    action_lower: tuple[float, ...]
    action_upper: tuple[float, ...]
    # Largest change of each action dimension between two consecutive control ticks.
    max_step: tuple[float, ...]
    # Indices of gripper dimensions (clipped to [action_lower, action_upper] like the rest, but
    # exempt from the step limit: grippers open and close in one command).
    gripper_indices: tuple[int, ...] = ()
    # A pose the safety filter may command when nothing else is known (joint profiles only).
    home: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        d = self.action_dim
        for attr in ("action_lower", "action_upper", "max_step"):
            if len(getattr(self, attr)) != d:
                raise ValueError(f"profile {self.name}: {attr} has {len(getattr(self, attr))} values, need {d}")
        if self.home and len(self.home) != d:
            raise ValueError(f"profile {self.name}: home has {len(self.home)} values, need {d}")
        if any(i < 0 or i >= d for i in self.gripper_indices):
            raise ValueError(f"profile {self.name}: gripper index out of range")
        if self.chunk_size < 1 or self.control_rate_hz <= 0:
            raise ValueError(f"profile {self.name}: chunk_size and control_rate_hz must be positive")

    @property
    def action_dim(self) -> int:
        return len(self.action_names)

    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    @property
    def action_units(self) -> tuple[str, ...]:
        """The unit of each action dimension ("rad", "m", or "" for the unitless rot6d entries), so
        plots and tools label values from the profile instead of guessing. Grippers are widths (m),
        joint profiles are radians, the end-effector profile is metres for xyz."""
        units = []
        for i, name in enumerate(self.action_names):
            if i in self.gripper_indices:
                units.append("m")
            elif self.action_space == "joint_position":
                units.append("rad")
            else:
                units.append("m" if name in ("x", "y", "z") else "")
        return tuple(units)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cameras)

    @property
    def dt(self) -> float:
        """Seconds per control tick."""
        return 1.0 / self.control_rate_hz

    @property
    def chunk_duration_s(self) -> float:
        return self.chunk_size / self.control_rate_hz

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "action_space": self.action_space,
            "action_names": list(self.action_names),
            "state_names": list(self.state_names),
            "chunk_size": self.chunk_size,
            "control_rate_hz": self.control_rate_hz,
            "cameras": [{"name": c.name, "height": c.height, "width": c.width} for c in self.cameras],
            "action_lower": list(self.action_lower),
            "action_upper": list(self.action_upper),
            "max_step": list(self.max_step),
            "gripper_indices": list(self.gripper_indices),
            "home": list(self.home),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RobotProfile:
        return cls(
            name=d["name"],
            description=d.get("description", ""),
            action_space=d["action_space"],
            action_names=tuple(d["action_names"]),
            state_names=tuple(d["state_names"]),
            chunk_size=int(d["chunk_size"]),
            control_rate_hz=float(d["control_rate_hz"]),
            cameras=tuple(CameraSpec(c["name"], int(c["height"]), int(c["width"])) for c in d["cameras"]),
            action_lower=tuple(float(x) for x in d["action_lower"]),
            action_upper=tuple(float(x) for x in d["action_upper"]),
            max_step=tuple(float(x) for x in d["max_step"]),
            gripper_indices=tuple(int(i) for i in d.get("gripper_indices", ())),
            home=tuple(float(x) for x in d.get("home", ())),
        )


# --- Franka Panda / FR3 -------------------------------------------------------------------------------
# Joint ranges and velocity limits from Franka's datasheet (Panda; FR3 is within them).
_PANDA_Q_MIN = (-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973)
_PANDA_Q_MAX = (2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973)
_PANDA_DQ_MAX = (2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61)
_PANDA_HOME = (0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785)
_FRANKA_GRIPPER_MAX_WIDTH = 0.08  # metres between the fingers
_FRANKA_RATE_HZ = 15.0  # DROID-style control rate used by the ChatVLA authors' Franka evaluations
# Stay well inside the velocity limits: at most half of them per tick.
_PANDA_STEP = tuple(round(0.5 * v / _FRANKA_RATE_HZ, 4) for v in _PANDA_DQ_MAX)

FRANKA_JOINT = RobotProfile(
    name="franka_joint",
    description="Franka Panda/FR3, 7 joint positions + gripper width, two cameras",
    action_space="joint_position",
    action_names=(*(f"joint{i}" for i in range(1, 8)), "gripper"),
    state_names=(*(f"joint{i}" for i in range(1, 8)), "gripper"),
    chunk_size=16,
    control_rate_hz=_FRANKA_RATE_HZ,
    cameras=(CameraSpec("front"), CameraSpec("wrist")),
    action_lower=(*_PANDA_Q_MIN, 0.0),
    action_upper=(*_PANDA_Q_MAX, _FRANKA_GRIPPER_MAX_WIDTH),
    max_step=(*_PANDA_STEP, _FRANKA_GRIPPER_MAX_WIDTH),
    gripper_indices=(7,),
    home=(*_PANDA_HOME, _FRANKA_GRIPPER_MAX_WIDTH),
)

# End-effector actions as the DexVLA/ChatVLA authors use them: xyz + 6-d rotation + gripper.
_EE_NAMES = ("x", "y", "z", "r11", "r21", "r31", "r12", "r22", "r32", "gripper")
FRANKA_EE = RobotProfile(
    name="franka_ee",
    description="Franka Panda/FR3, end-effector xyz + rot6d + gripper width, two cameras",
    action_space="ee_pose_rot6d",
    action_names=_EE_NAMES,
    state_names=_EE_NAMES,
    chunk_size=16,
    control_rate_hz=_FRANKA_RATE_HZ,
    cameras=(CameraSpec("exterior"), CameraSpec("wrist")),
    # A workspace box in the robot base frame (metres); rotation columns are unit vectors.
    action_lower=(0.2, -0.6, 0.0, -1, -1, -1, -1, -1, -1, 0.0),
    action_upper=(0.85, 0.6, 0.9, 1, 1, 1, 1, 1, 1, _FRANKA_GRIPPER_MAX_WIDTH),
    max_step=(0.02, 0.02, 0.02, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, _FRANKA_GRIPPER_MAX_WIDTH),
    gripper_indices=(9,),
)

# --- ARX R5 bimanual -----------------------------------------------------------------------------------
# Placeholder joint ranges (symmetric, conservative); confirm against the R5 URDF of your unit.
_ARX_RATE_HZ = 20.0  # the arx-r5-sdk default cfg["dt"] = 0.05 s
_ARX_Q_LIM = (3.1, 3.1, 3.1, 1.6, 1.6, 3.1)
_ARX_DQ_MAX = 3.0  # rad/s
_ARX_GRIPPER_MAX = 0.088  # metres, ARX5 default gripper width
_ARX_ARM_NAMES = ("joint1", "joint2", "joint3", "joint4", "joint5", "joint6", "gripper")
_ARX_NAMES = tuple(f"left_{n}" for n in _ARX_ARM_NAMES) + tuple(f"right_{n}" for n in _ARX_ARM_NAMES)
_ARX_ARM_STEP = (*([round(0.5 * _ARX_DQ_MAX / _ARX_RATE_HZ, 4)] * 6), _ARX_GRIPPER_MAX)
ARX_R5_BIMANUAL = RobotProfile(
    name="arx_r5_bimanual",
    description="ARX R5 bimanual rig, 2 x (6 joints + gripper), top and two wrist cameras",
    action_space="joint_position",
    action_names=_ARX_NAMES,
    state_names=_ARX_NAMES,
    chunk_size=50,
    control_rate_hz=_ARX_RATE_HZ,
    cameras=(CameraSpec("cam_top"), CameraSpec("cam_left_wrist"), CameraSpec("cam_right_wrist")),
    action_lower=(*(-q for q in _ARX_Q_LIM), 0.0) * 2,
    action_upper=(*_ARX_Q_LIM, _ARX_GRIPPER_MAX) * 2,
    max_step=_ARX_ARM_STEP * 2,
    gripper_indices=(6, 13),
    home=(0.0,) * 6 + (_ARX_GRIPPER_MAX,) + (0.0,) * 6 + (_ARX_GRIPPER_MAX,),
)

PROFILES: dict[str, RobotProfile] = {p.name: p for p in (FRANKA_JOINT, FRANKA_EE, ARX_R5_BIMANUAL)}


def get_profile(name: str) -> RobotProfile:
    """Look a profile up by name, with an error that lists the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown robot profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
