"""Fake arm SDKs, injected through sys.modules, that record every call the adapters make.

Each fake mirrors only the slice of the real API the adapter uses (names and signatures taken from
panda-python 1.1.1, franky-control 2.0.0 and arx-r5-sdk 1.0.0), so a test failing here means the
adapter's mapping changed, not the fake.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest

from chatvla.client.robots.cameras import static_cameras
from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_EE, FRANKA_JOINT

PANDA_HOME = np.array(FRANKA_JOINT.home[:7])


@dataclass
class Calls:
    log: list[tuple] = field(default_factory=list)

    def add(self, *item: object) -> None:
        self.log.append(item)

    def named(self, name: str) -> list[tuple]:
        return [c for c in self.log if c[0] == name]


def fake_gripper(calls: Calls, state: dict, *, grasped_width: float | None = None) -> type:
    """The libfranka gripper both Franka SDKs wrap (panda-py's `libfranka.Gripper`, franky's `Gripper`):
    same calls, recorded under the same names; each SDK's fake adds how it reads the width back.
    `grasped_width`: where a grasp leaves the fingers (None: the width is left as it was)."""

    class Gripper:
        def __init__(self, hostname):
            calls.add("Gripper", hostname)

        def move(self, width, speed):
            calls.add("gripper.move", width, speed)
            state["width"] = width
            return True

        def grasp(self, width, speed, force, epsilon_inner=0.005, epsilon_outer=0.005):
            calls.add("gripper.grasp", width, speed, force, epsilon_inner, epsilon_outer)
            if grasped_width is not None:
                state["width"] = grasped_width
            return True

    return Gripper


# --- panda_py ----------------------------------------------------------------------------------------
def make_fake_panda_py(calls: Calls, *, q=PANDA_HOME, refuse: bool = False, width: float = 0.08):
    mod = types.ModuleType("panda_py")
    state = {"q": np.array(q, dtype=float), "error": None, "width": width}

    class Panda:
        def __init__(self, hostname, name="panda", realtime_config=None):
            if refuse:
                raise RuntimeError("libfranka: Connection to FCI refused.")
            calls.add("Panda", hostname)

        @property
        def q(self):
            return state["q"].copy()

        def get_position(self):
            return np.array([0.4, 0.0, 0.5])

        def get_orientation(self, scalar_first=False):
            return np.array([1.0, 0.0, 0.0, 0.0])  # x y z w: 180 deg about x (gripper down)

        def raise_error(self):
            if state["error"]:
                raise RuntimeError(state["error"])

        def start_controller(self, ctrl):
            calls.add("start_controller", type(ctrl).__name__)

        def stop_controller(self):
            calls.add("stop_controller")

    class JointPosition:
        def __init__(self, stiffness=None, damping=None, filter_coeff=1.0):
            calls.add("JointPosition", filter_coeff)

        def set_control(self, position, velocity=None):
            calls.add("set_control", np.array(position), None if velocity is None else np.array(velocity))

    class CartesianImpedance:
        def __init__(self, impedance=None, damping_ratio=1.0, nullspace_stiffness=0.5, filter_coeff=1.0):
            calls.add("CartesianImpedance", filter_coeff)

        def set_control(self, position, orientation, q_nullspace=None):
            calls.add("set_control_ee", np.array(position), np.array(orientation))

    class Gripper(fake_gripper(calls, state, grasped_width=0.03)):
        def read_once(self):
            return types.SimpleNamespace(width=state["width"])

    mod.Panda = Panda
    mod.controllers = types.SimpleNamespace(JointPosition=JointPosition, CartesianImpedance=CartesianImpedance)
    mod.libfranka = types.SimpleNamespace(Gripper=Gripper)
    mod._state = state
    return mod


# --- franky --------------------------------------------------------------------------------------------
def make_fake_franky(calls: Calls, *, q=PANDA_HOME, refuse: str | None = None, has_errors: bool = False):
    mod = types.ModuleType("franky")
    state = {"q": np.array(q, dtype=float), "motion_error": None, "width": 0.08, "has_errors": has_errors}

    class RealtimeConfig:
        Enforce = "Enforce"
        Ignore = "Ignore"

    class _Motion:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class JointMotion(_Motion):
        pass

    class JointStopMotion(_Motion):
        pass

    class CartesianMotion(_Motion):
        pass

    class CartesianStopMotion(_Motion):
        pass

    class JointState:
        def __init__(self, position, velocity=None):
            self.position = np.array(position)

    class Affine:
        def __init__(self, matrix):
            self.matrix = np.array(matrix)

    class RobotPose:
        def __init__(self, end_effector_pose):
            self.end_effector_pose = end_effector_pose

    class CartesianState:
        def __init__(self, pose):
            self.pose = pose

    class Robot:
        def __init__(self, fci_hostname, relative_dynamics_factor=1.0, realtime_config=RealtimeConfig.Enforce):
            if refuse:
                raise RuntimeError(refuse)
            calls.add("Robot", fci_hostname, realtime_config, relative_dynamics_factor)

        @property
        def has_errors(self):
            return state["has_errors"]

        def recover_from_errors(self):
            calls.add("recover_from_errors")
            state["has_errors"] = False

        @property
        def current_joint_state(self):
            return JointState(state["q"].copy())

        @property
        def current_cartesian_state(self):
            t = np.eye(4)
            t[:3, :3] = np.diag([1.0, -1.0, -1.0])
            t[:3, 3] = [0.4, 0.0, 0.5]
            return CartesianState(RobotPose(Affine(t)))

        def poll_motion(self):
            if state["motion_error"]:
                raise RuntimeError(state["motion_error"])
            return False

        def move(self, motion, asynchronous=False):
            calls.add("move", motion, asynchronous)

        def join_motion(self, timeout=None):
            calls.add("join_motion", timeout)
            return True

    class Gripper(fake_gripper(calls, state)):
        @property
        def width(self):
            return state["width"]

    for obj in (
        RealtimeConfig,
        JointMotion,
        JointStopMotion,
        CartesianMotion,
        CartesianStopMotion,
        JointState,
        Affine,
        RobotPose,
        CartesianState,
        Robot,
        Gripper,
    ):
        setattr(mod, obj.__name__, obj)
    mod._state = state
    return mod


# --- arx_r5_sdk ------------------------------------------------------------------------------------------
def make_fake_arx(calls: Calls, joints: dict[str, list[float]]):
    """`joints` maps can_port -> what get_joint_positions returns (mutable: tests change it mid-run)."""
    mod = types.ModuleType("arx_r5_sdk")

    class SingleArm:
        def __init__(self, config):
            calls.add("SingleArm", dict(config))
            self.port = config["can_port"]

        def get_joint_positions(self):
            return list(joints[self.port])

        def set_joint_positions(self, positions):
            calls.add("set_joint_positions", self.port, np.array(positions))

        def set_catch_pos(self, pos):
            calls.add("set_catch_pos", self.port, pos)

    mod.SingleArm = SingleArm
    return mod


def make_sysfs(root, ifaces: dict[str, bool]):
    """A fake /sys/class/net: iface -> up?"""
    net = root / "net"
    net.mkdir(exist_ok=True)
    for name, up in ifaces.items():
        (net / name).mkdir(exist_ok=True)
        (net / name / "flags").write_text("0x1003\n" if up else "0x1002\n")
    return net


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def franka_cams():
    return static_cameras(FRANKA_JOINT)


@pytest.fixture
def franka_ee_cams():
    return static_cameras(FRANKA_EE)


@pytest.fixture
def arx_cams():
    return static_cameras(ARX_R5_BIMANUAL)


@pytest.fixture
def install(monkeypatch):
    """install("panda_py", module) puts a fake SDK where `import panda_py` will find it."""

    def _install(name: str, module) -> None:
        monkeypatch.setitem(sys.modules, name, module)

    return _install


@pytest.fixture
def fakes():
    return types.SimpleNamespace(
        panda_py=make_fake_panda_py, franky=make_fake_franky, arx=make_fake_arx, sysfs=make_sysfs
    )
