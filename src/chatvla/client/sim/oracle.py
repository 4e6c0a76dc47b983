"""A scripted expert for the sims: top-down pick-and-place planned with damped least-squares IK and
replayed as joint-position actions that respect the profile's per-tick step limits.

It exists for tests (a task the oracle solves proves that the scene, the grasp physics and the
success check agree) and for recording demonstration episodes. It plans open loop from the current
state, which is enough in a deterministic sim. `solve_task_with_retry` plans a demonstration of
recovering from a missed grasp: a policy trained only on clean demonstrations has never seen an arm
lift an empty gripper, so after its first miss it carries on as if it held the card and never tries again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mujoco
import numpy as np

from chatvla.client.sim.robot import SimRobot
from chatvla.client.sim.tasks.base import ObjectSpec

MAX_WAYPOINT_JUMP = 0.35  # rad per 1 cm waypoint; more means the IK switched branch


class PlanningError(RuntimeError):
    """The oracle cannot reach a waypoint (out of reach, or IK did not converge)."""


@dataclass(frozen=True)
class OracleConfig:
    hover: float = 0.10  # approach and retreat height above the grasp point (m)
    lift: float = 0.10  # carrying height above the grasp point (m)
    cart_step: float = 0.01  # spacing of Cartesian waypoints on straight segments (m)
    speed: float = 0.5  # fraction of the profile's max per-tick step used while moving
    grip_ticks: float = 0.6  # seconds to close or open the gripper
    settle_ticks: float = 0.4  # seconds to let the servos catch up before grasping or releasing
    ik_tol: float = 2e-3  # position tolerance (m)
    ik_rot_tol: float = 0.08  # orientation tolerance (rad)


def grasp_rotation(robot: SimRobot, closing_yaw: float) -> np.ndarray:
    """TCP orientation for a top-down grasp whose fingers close along `closing_yaw` (world)."""
    a, c = robot.rig.tcp_approach_axis, robot.rig.tcp_closing_axis
    k = 3 - a - c
    rot = np.zeros((3, 3))
    rot[:, a] = (0.0, 0.0, -1.0)
    rot[:, c] = (math.cos(closing_yaw), math.sin(closing_yaw), 0.0)
    sign = 1.0 if (a, c, k) in ((0, 1, 2), (1, 2, 0), (2, 0, 1)) else -1.0
    rot[:, k] = sign * np.cross(rot[:, a], rot[:, c])
    return rot


def solve_ik(
    robot: SimRobot,
    arm: int,
    pos: np.ndarray,
    rot: np.ndarray,
    q0: np.ndarray,
    *,
    tol: float = 2e-3,
    rot_tol: float = 0.05,
    iters: int = 150,
    restarts: int = 8,
    damping: float = 1e-3,
) -> np.ndarray:
    """Joint angles for one arm putting its TCP at (pos, rot). Starts from `q0` (that arm's joints) so
    consecutive waypoints stay on one branch; if that gets stuck against a joint limit, retries from
    the rig's start pose and from fixed pseudo-random seeds (deterministic). Works on a scratch MjData:
    the simulation itself is untouched."""
    m = robot.model
    d = mujoco.MjData(m)
    d.qpos[:] = robot.data.qpos
    prefix = robot.rig.mounts[arm].prefix
    jids = [m.joint(prefix + j).id for j in robot.rig.arm_joints]
    qadr = np.array([m.jnt_qposadr[j] for j in jids])
    dadr = np.array([m.jnt_dofadr[j] for j in jids])
    lo, hi = m.jnt_range[jids, 0], m.jnt_range[jids, 1]
    sid = m.site(prefix + robot.rig.tcp_site).id
    jacp, jacr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
    n = len(jids)
    start = robot.rig.arm_dim * arm
    rng = np.random.default_rng(0)
    seeds = [np.asarray(q0, float)]
    if restarts:
        seeds.append(np.asarray(robot.rig.reset_q[start : start + n], float))
        seeds += [rng.uniform(lo, hi) for _ in range(restarts)]
    best = (np.inf, np.inf)
    for seed in seeds:
        q = np.clip(seed, lo, hi)
        for _ in range(iters):
            d.qpos[qadr] = q
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            cur = d.site_xmat[sid].reshape(3, 3)
            err_p = pos - d.site_xpos[sid]
            err_r = 0.5 * sum(np.cross(cur[:, i], rot[:, i]) for i in range(3))
            if np.linalg.norm(err_p) < tol and np.linalg.norm(err_r) < rot_tol:
                return q
            mujoco.mj_jacSite(m, d, jacp, jacr, sid)
            jac = np.vstack([jacp[:, dadr], jacr[:, dadr]])
            err = np.concatenate([err_p, err_r])
            dq = jac.T @ np.linalg.solve(jac @ jac.T + damping * np.eye(6), err)
            q = np.clip(q + np.clip(dq, -0.2, 0.2), lo, hi)
        best = min(best, (float(np.linalg.norm(err_p)), float(np.linalg.norm(err_r))))
    raise PlanningError(
        f"IK for arm {arm} did not reach {np.round(pos, 3)} (best error {best[0]:.3f} m, {best[1]:.3f} rad)"
    )


def _grasp_params(obj: ObjectSpec, pad_half: float, max_width: float) -> tuple[float, float, float]:
    """(closing yaw offset from the object's yaw, tcp height, open width) for a top-down grasp across
    the object's narrow horizontal side, low enough to hold it but keeping the pads off the table."""
    if obj.shape in ("box", "ellipsoid"):
        across_x = obj.size[0] <= obj.size[1]
        half = obj.size[0] if across_x else obj.size[1]
        offset = 0.0 if across_x else math.pi / 2
    else:
        half, offset = obj.size[0], 0.0
    top = 2 * obj.rest_z  # every shape rests on its lowest point, centred at rest_z
    z = max(pad_half + 0.003, min(obj.rest_z, top - 0.025))
    return offset, z, min(max_width, 2 * half + 0.025)


class PickPlacePlanner:
    """Plans "pick object, put it at (x, y)" for a SimRobot as a [T, action_dim] array of actions.

    A bimanual rig uses the arm nearest the object; when neither arm alone reaches both the object and
    the goal (they lie on opposite sides), the first arm sets the object down on the midline and the
    other arm takes it from there, the way a person hands over with the table in between.
    """

    def __init__(self, robot: SimRobot, config: OracleConfig | None = None) -> None:
        self.robot = robot
        self.cfg = config or OracleConfig()
        self._step = np.asarray(robot.profile.max_step) * self.cfg.speed

    def plan(self, object_name: str, goal_xy: tuple[float, float]) -> np.ndarray:
        """Actions (one per tick) that move `object_name` to `goal_xy` (task frame), then return the
        arm to its start pose. Raises PlanningError if no arm (or pair of arms) can do it."""
        return self._plan(object_name, goal_xy, None)

    def plan_miss(self, object_name: str, offset_xy: tuple[float, float]) -> np.ndarray:
        """Actions of a grasp that misses: down to `offset_xy` (metres) beside `object_name`, close
        the gripper, lift back to the approach height, and stop there. Raises PlanningError if no
        arm reaches that point."""
        return self._plan(object_name, (0.0, 0.0), np.asarray(offset_xy, float))

    def _plan(self, object_name: str, goal_xy: tuple[float, float], miss: np.ndarray | None) -> np.ndarray:
        robot = self.robot
        if robot.task is None:
            raise PlanningError("no task loaded")
        obj = robot.task.object(object_name)
        pose = robot.object_poses()[object_name]
        ox, oy = robot.rig.task_origin
        start = np.array([pose.pos[0] + ox, pose.pos[1] + oy])
        goal = np.array([goal_xy[0] + ox, goal_xy[1] + oy])
        yaw = math.atan2(pose.rot[1, 0], pose.rot[0, 0])
        q = robot.state().astype(np.float64)
        mounts = robot.rig.mounts
        arms = sorted(range(len(mounts)), key=lambda i: abs(mounts[i].pos[1] - start[1]))
        errors = []
        if miss is not None:
            start = start + miss
        for arm in arms:
            try:
                return np.asarray(self._pick_place(arm, obj, start, yaw, goal, q, miss_only=miss is not None)[0],
                                  np.float32)
            except PlanningError as exc:
                errors.append(str(exc))
        if len(arms) == 2 and miss is None:
            mid = np.array([(start[0] + goal[0]) / 2, (mounts[0].pos[1] + mounts[1].pos[1]) / 2])
            try:
                first, q, placed_yaw = self._pick_place(arms[0], obj, start, yaw, mid, q)
                second, _, _ = self._pick_place(arms[1], obj, mid, placed_yaw, goal, q)
                return np.asarray(first + second, np.float32)
            except PlanningError as exc:
                errors.append(f"handover: {exc}")
        raise PlanningError("; ".join(errors))

    def _pick_place(
        self, arm: int, obj: ObjectSpec, start: np.ndarray, obj_yaw: float, goal: np.ndarray, q: np.ndarray,
        *, miss_only: bool = False,
    ) -> tuple[list[np.ndarray], np.ndarray, float]:
        """(actions, final action vector, object yaw after placing) for one arm; `miss_only`: the
        grasp and the lift back up only."""
        rig = self.robot.rig
        gi = arm * rig.arm_dim + rig.arm_dim - 1
        offset, z, open_w = _grasp_params(obj, rig.pad_half_height, self.robot.profile.action_upper[gi])
        first = _nearest_symmetric(obj_yaw + offset, self.robot.tcp_pose(arm)[1][:, rig.tcp_closing_axis])
        # A parallel gripper grasps the same at yaw and yaw + pi, but joint limits often allow only one.
        try:
            actions, q_end = self._grasp_sequence(arm, start, goal, first, z, open_w, q, miss_only)
            yaw = first
        except PlanningError:
            yaw = math.remainder(first + math.pi, 2 * math.pi)
            actions, q_end = self._grasp_sequence(arm, start, goal, yaw, z, open_w, q, miss_only)
        return actions, q_end, yaw - offset

    def _grasp_sequence(
        self, arm: int, start: np.ndarray, goal: np.ndarray, yaw: float, z: float, open_w: float, q_start: np.ndarray,
        miss_only: bool = False,
    ) -> tuple[list[np.ndarray], np.ndarray]:
        robot, cfg, rig = self.robot, self.cfg, self.robot.rig
        lo = arm * rig.arm_dim
        gi = lo + rig.arm_dim - 1
        rot = grasp_rotation(robot, yaw)
        actions: list[np.ndarray] = []
        q = q_start.copy()
        q[gi] = open_w

        def move(points: list[np.ndarray], free: bool = False) -> None:
            """Through `points` along a straight line: each IK warm-starts from the last and may not
            restart elsewhere, so the arm stays on one branch. `free`: a single joint-space move to a
            point, where any IK branch will do."""
            nonlocal q
            for p in points:
                target = q.copy()
                target[lo:gi] = solve_ik(
                    robot, arm, p, rot, q[lo:gi], tol=cfg.ik_tol, rot_tol=cfg.ik_rot_tol, restarts=8 if free else 0
                )
                if not free and np.max(np.abs(target[lo:gi] - q[lo:gi])) > MAX_WAYPOINT_JUMP:
                    raise PlanningError(f"arm {arm} would swing to another IK branch near {np.round(p, 3)}")
                actions.extend(self._interpolate(q, target))
                q = target

        def wait(seconds: float) -> None:
            actions.extend([q.copy()] * max(1, round(seconds * robot.profile.control_rate_hz)))

        grasp, carry, place = z, z + cfg.lift, z + 0.004
        move([np.array([*start, z + cfg.hover])], free=True)  # from wherever the arm is
        move(self._line(np.array([*start, z + cfg.hover]), np.array([*start, grasp])))
        wait(cfg.settle_ticks)  # let the servos catch up before closing on a 12 mm card
        q[gi] = 0.0
        wait(cfg.grip_ticks)
        if miss_only:  # where a person would notice the empty gripper
            move(self._line(np.array([*start, grasp]), np.array([*start, z + cfg.hover])))
            return actions, q
        move(self._line(np.array([*start, grasp]), np.array([*start, carry])))
        move(self._line(np.array([*start, carry]), np.array([*goal, carry])))
        move(self._line(np.array([*goal, carry]), np.array([*goal, place])))
        wait(cfg.settle_ticks)
        q[gi] = open_w
        wait(cfg.grip_ticks)
        move(self._line(np.array([*goal, place]), np.array([*goal, z + cfg.hover])))
        home = q.copy()
        home[lo : gi + 1] = np.asarray(rig.reset_q)[lo : gi + 1]
        actions.extend(self._interpolate(q, home))
        return actions, home

    def _line(self, a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
        n = max(1, math.ceil(np.linalg.norm(b - a) / self.cfg.cart_step))
        return [a + (b - a) * (i / n) for i in range(1, n + 1)]

    def _interpolate(self, q0: np.ndarray, q1: np.ndarray) -> list[np.ndarray]:
        """Ticks from q0 to q1 with every joint within its step limit (grippers excluded: they jump)."""
        delta = q1 - q0
        arm_mask = np.ones_like(delta, bool)
        arm_mask[list(self.robot.profile.gripper_indices)] = False
        n = max(1, math.ceil(np.max(np.abs(delta[arm_mask]) / self._step[arm_mask])))
        return [q0 + delta * (i / n) for i in range(1, n + 1)]


def _nearest_symmetric(yaw: float, closing_axis: np.ndarray) -> float:
    """A parallel gripper closes the same along yaw and yaw + pi: pick the one needing less wrist turn."""
    current = math.atan2(closing_axis[1], closing_axis[0])
    best = min((yaw, yaw + math.pi), key=lambda y: abs(math.remainder(y - current, 2 * math.pi)))
    return math.remainder(best, 2 * math.pi)


def solve_task(robot: SimRobot, config: OracleConfig | None = None) -> np.ndarray:
    """The oracle's actions for the loaded task, from the current state."""
    if robot.task is None:
        raise PlanningError("no task loaded")
    name, goal = robot.task.oracle_goal()
    return PickPlacePlanner(robot, config).plan(name, goal)


def miss_offset(seed: int, distance: float) -> tuple[float, float]:
    """Where a deliberate miss lands relative to the object: between half of `distance` and all of it
    (metres), in a direction drawn from `seed` (deterministic, so a recorded episode replays)."""
    rng = np.random.default_rng([seed, 7])
    angle, r = float(rng.uniform(0.0, 2 * math.pi)), distance * float(rng.uniform(0.5, 1.0))
    return r * math.cos(angle), r * math.sin(angle)


def solve_task_with_retry(robot: SimRobot, miss: float, config: OracleConfig | None = None) -> tuple[np.ndarray, int]:
    """(actions, the tick the retry starts at) of a demonstration that misses its first grasp by up
    to `miss` metres (`miss_offset`), lifts the empty gripper, and then solves the task from wherever that left the arm
    and the object. Plans by running the miss in the sim, then resets the robot to the task's start
    (the sim is deterministic: the recorded run meets the same state). Raises PlanningError when the
    miss is out of reach, still lifts the object, or leaves nothing the oracle can plan."""
    task = robot.task
    if task is None:
        raise PlanningError("no task loaded")
    name, _ = task.oracle_goal()
    spec = task.object(name)
    first = PickPlacePlanner(robot, config).plan_miss(name, miss_offset(task.seed, miss))
    try:
        for action in first:
            robot.command(action)
        if robot.object_poses()[name].pos[2] > spec.rest_z + 0.01:
            raise PlanningError(f"the deliberate miss still lifted {name}")
        retry = solve_task(robot, config)
    finally:
        robot.reset(task)
    return np.concatenate([first, retry]).astype(np.float32), len(first)
