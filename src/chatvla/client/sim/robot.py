"""`SimRobot`: a rig plus a task in MuJoCo, behind the same `Robot` interface as the real arms.

Time is the control tick: each `command`/`hold` advances physics by exactly one tick of the profile
(`profile.dt`), so a sim episode replays identically whatever the host's speed, and a slow host
simply runs slower than real time. `observe` renders the profile's cameras from the current state.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import mujoco
import numpy as np

from chatvla.client.robots.base import Robot, RobotObservation
from chatvla.client.sim.render import CameraRig, project
from chatvla.client.sim.rigs import Rig, get_rig
from chatvla.client.sim.scene import build_model
from chatvla.client.sim.tasks.base import Pose, Task, TaskResult
from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_JOINT, RobotProfile

SETTLE_S = 0.3  # physics time after a reset so objects come to rest before the first observation


class SimRobot(Robot):
    """A simulated rig running one task at a time. Deterministic: same task, same commands, same states.

    `render=False` skips the cameras (observations then carry no images), for physics-only tests and
    for planning.
    """

    def __init__(
        self,
        rig: Rig | str,
        task: Task | None = None,
        *,
        render: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rig = get_rig(rig) if isinstance(rig, str) else rig
        self._render = render
        self._clock = clock
        self._cameras: CameraRig | None = None
        self.task: Task | None = task
        self.model = build_model(self.rig, task)
        self.data = mujoco.MjData(self.model)
        self._load()
        self.reset()

    # --- Robot interface -----------------------------------------------------------------------------
    @property
    def profile(self) -> RobotProfile:
        return self.rig.profile

    def observe(self) -> RobotObservation:
        images = self._cameras.render(self.data) if self._cameras is not None else {}
        return RobotObservation(images=images, state=self.state(), timestamp=self._clock())

    def command(self, action: np.ndarray) -> None:
        """Set joint targets and gripper widths for this tick, then advance one tick."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.profile.action_dim,):
            raise ValueError(
                f"action has shape {action.shape}, profile {self.profile.name} needs ({self.profile.action_dim},)"
            )
        if not np.all(np.isfinite(action)):
            raise ValueError("action has non-finite values")
        self.data.ctrl[self._ctrl_ids] = action * self._ctrl_scale
        self._holding = False
        self._step_tick()

    def hold(self) -> None:
        """Keep the joints where they are now and the gripper command as it was (so a held object stays
        held), then advance one tick. The hold target is latched on the first hold of a run: re-reading
        it every tick would let a loaded joint ratchet down by its servo's steady-state error."""
        if not self._holding:
            self.data.ctrl[self._arm_ctrl_ids] = self.data.qpos[self._arm_qpos]
            self._holding = True
        self._step_tick()

    def close(self) -> None:
        """Release the GL renderers (observations carry no images until `reset(task)` builds anew)."""
        if self._cameras is not None:
            self._cameras.close()
            self._cameras = None

    # --- sim-only API --------------------------------------------------------------------------------
    def reset(self, task: Task | None = None) -> RobotObservation:
        """Start an episode: rebuild the scene for `task` (or keep the current one), put the arms in
        the rig's start pose and let the objects settle."""
        if task is not None:
            self.close()
            self.task = task
            self.model = build_model(self.rig, task)
            self.data = mujoco.MjData(self.model)
            self._load()
        mujoco.mj_resetData(self.model, self.data)
        self.set_joint_positions(np.asarray(self.rig.reset_q))
        mujoco.mj_step(self.model, self.data, nstep=max(1, round(SETTLE_S / self.model.opt.timestep)))
        self.ticks = 0
        self._holding = False
        return self.observe()

    @property
    def sim_time(self) -> float:
        return float(self.data.time)

    def state(self) -> np.ndarray:
        """Joint positions and gripper widths in action order (float32, robot units), as encoders read
        them: within each joint's range. MuJoCo's joint limits are soft, so a finger pressed against
        the table or a card's edge can sit past its stop (a gripper "width" of -2 cm, or 26 cm): no real
        gripper reports that, and a server rightly refuses it as out of the profile's range, which held
        the arm without new chunks mid-grasp."""
        q = np.clip(self.data.qpos[self._state_qpos], self._state_lo, self._state_hi)
        return (q / self._ctrl_scale).astype(np.float32)

    def set_joint_positions(self, q: np.ndarray) -> None:
        """Teleport the arms (and their targets) to `q`, an action-shaped vector; no physics step."""
        q = np.asarray(q, np.float64)
        self.data.qpos[self._state_qpos] = q * self._ctrl_scale
        self.data.qpos[self._mirror_qpos] = self.data.qpos[self._mirror_src] * self._mirror_sign
        self.data.qvel[:] = 0.0
        self.data.ctrl[self._ctrl_ids] = q * self._ctrl_scale
        mujoco.mj_forward(self.model, self.data)

    def object_poses(self) -> dict[str, Pose]:
        """Every task object's pose in the task frame."""
        ox, oy = self.rig.task_origin
        poses = {}
        for name, bid in self._object_bodies.items():
            pos = self.data.xpos[bid] - np.array([ox, oy, 0.0])
            poses[name] = Pose(pos.copy(), self.data.xmat[bid].reshape(3, 3).copy())
        return poses

    def set_object_pose(self, name: str, x: float, y: float, z: float | None = None, yaw: float = 0.0) -> None:
        """Teleport an object (task frame; `z` defaults to its resting height), at rest."""
        obj = self.task.object(name) if self.task is not None else None
        if obj is None:
            raise KeyError(f"no task object {name!r}")
        joint = self.model.joint(name)
        adr, dadr = joint.qposadr[0], joint.dofadr[0]
        ox, oy = self.rig.task_origin
        self.data.qpos[adr : adr + 3] = (ox + x, oy + y, obj.rest_z if z is None else z)
        self.data.qpos[adr + 3 : adr + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))
        self.data.qvel[dadr : dadr + 6] = 0.0
        mujoco.mj_forward(self.model, self.data)

    def check_success(self) -> TaskResult:
        if self.task is None:
            return TaskResult(False, "no task loaded")
        return self.task.check(self.object_poses())

    def pixels_of(self, name: str, camera: str) -> np.ndarray:
        """Where a task object's centre appears in a profile camera's image: (column, row) in pixels,
        NaN when it is behind the camera; it may lie outside the image. Used to label scenes (which image
        token shows which card), not by the control loop."""
        spec = next((c for c in self.profile.cameras if c.name == camera), None)
        if spec is None:
            raise KeyError(f"profile {self.profile.name} has no camera {camera!r}")
        if name not in self._object_bodies:
            raise KeyError(f"no task object {name!r}")
        point = self.data.xpos[self._object_bodies[name]][None]
        return project(self.model, self.data, self.rig.cameras[camera], point, spec.height, spec.width)[0]

    def tcp_pose(self, arm: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """World position and rotation of an arm's tool centre point (between the finger pads)."""
        sid = self._tcp_sites[arm]
        return self.data.site_xpos[sid].copy(), self.data.site_xmat[sid].reshape(3, 3).copy()

    # --- internals -----------------------------------------------------------------------------------
    def _load(self) -> None:
        """Per-model set-up: name lookups and (optionally) the camera renderers."""
        self._index()
        if self._render:
            cams = {c: self.rig.cameras[c.name] for c in self.profile.cameras}
            self._cameras = CameraRig(self.model, cams)

    def _step_tick(self) -> None:
        mujoco.mj_step(self.model, self.data, nstep=self.rig.n_substeps)
        self.ticks += 1

    def _index(self) -> None:
        """Resolve names to ids once per model: the hot path then only does array indexing."""
        m, rig = self.model, self.rig
        ctrl, qpos, scale, arm_ctrl, arm_qpos, mirror, mirror_src, mirror_sign, tcp = ([] for _ in range(9))
        for mount in rig.mounts:
            for j in rig.arm_joints:
                ctrl.append(m.actuator(mount.prefix + j).id)
                qpos.append(m.joint(mount.prefix + j).qposadr[0])
                scale.append(1.0)
            arm_ctrl += ctrl[-len(rig.arm_joints) :]
            arm_qpos += qpos[-len(rig.arm_joints) :]
            ctrl.append(m.actuator(mount.prefix + rig.gripper_actuator).id)
            qpos.append(m.joint(mount.prefix + rig.gripper_joint).qposadr[0])
            scale.append(0.5)  # actuator/joint = one finger's travel = half the width
            # The second finger follows through an equality; teleports must set it too.
            eq = next(i for i in range(m.neq) if m.eq_obj2id[i] == m.joint(mount.prefix + rig.gripper_joint).id)
            mirror.append(m.jnt_qposadr[m.eq_obj1id[eq]])
            mirror_src.append(qpos[-1])
            mirror_sign.append(m.eq_data[eq, 1])
            tcp.append(m.site(mount.prefix + rig.tcp_site).id)
        self._ctrl_ids = np.array(ctrl)
        self._state_qpos = np.array(qpos)
        joints = [int(np.flatnonzero(m.jnt_qposadr == a)[0]) for a in qpos]
        limited = np.array([bool(m.jnt_limited[j]) for j in joints])
        self._state_lo = np.where(limited, m.jnt_range[joints, 0], -np.inf)
        self._state_hi = np.where(limited, m.jnt_range[joints, 1], np.inf)
        self._ctrl_scale = np.array(scale)
        self._arm_ctrl_ids = np.array(arm_ctrl)
        self._arm_qpos = np.array(arm_qpos)
        self._mirror_qpos, self._mirror_src = np.array(mirror), np.array(mirror_src)
        self._mirror_sign = np.array(mirror_sign)
        self._tcp_sites = tcp
        self._object_bodies = {o.name: m.body(o.name).id for o in self.task.objects} if self.task else {}


def make_sim_robot(profile: str | RobotProfile, task: Task | None = None, *, render: bool = True) -> SimRobot:
    """The simulated robot for a profile name ("franka_joint", "arx_r5_bimanual")."""
    name = profile if isinstance(profile, str) else profile.name
    return SimRobot(get_rig(name), task, render=render)


def _make_for(profile: str, task: Task | None, task_kind: str, seed: int, split: str, render: bool) -> SimRobot:
    from chatvla.client.sim.tasks import make_task

    return make_sim_robot(profile, task or make_task(task_kind, seed=seed, split=split), render=render)


def make_sim_panda(task: Task | None = None, *, task_kind: str = "math_matching", seed: int = 0,
                   split: str = "train", render: bool = True) -> SimRobot:
    """Registry factory for "sim-panda": the Franka joint profile on the tabletop scene."""
    return _make_for(FRANKA_JOINT.name, task, task_kind, seed, split, render)


def make_sim_bimanual(task: Task | None = None, *, task_kind: str = "math_matching", seed: int = 0,
                      split: str = "train", render: bool = True) -> SimRobot:
    """Registry factory for "sim-bimanual": the ARX R5 bimanual profile on the tabletop scene."""
    return _make_for(ARX_R5_BIMANUAL.name, task, task_kind, seed, split, render)
