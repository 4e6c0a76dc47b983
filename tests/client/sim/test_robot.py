"""SimRobot physics: stepping, control, state, success from qpos edits, determinism (no rendering)."""

from __future__ import annotations

import numpy as np
import pytest

from chatvla.client.sim.tasks import make_task
from chatvla.client.sim.tasks.math_matching import card_name
from chatvla.profiles import get_profile

pytestmark = pytest.mark.sim
PROFILES = ("franka_joint", "arx_r5_bimanual")


@pytest.fixture(params=PROFILES)
def robot(request, mujoco_module):
    from chatvla.client.sim.robot import make_sim_robot

    r = make_sim_robot(request.param, make_task("math_matching", 1), render=False)
    yield r
    r.close()


def test_rig_timing_matches_profile(robot) -> None:
    assert robot.rig.n_substeps * robot.model.opt.timestep == pytest.approx(robot.profile.dt)
    t0 = robot.sim_time
    for _ in range(5):
        robot.hold()
    assert robot.sim_time - t0 == pytest.approx(5 * robot.profile.dt)


def test_state_is_profile_shaped_and_starts_at_reset_pose(robot) -> None:
    obs = robot.observe()
    assert obs.state.shape == (robot.profile.state_dim,) and obs.state.dtype == np.float32
    assert np.allclose(obs.state, robot.rig.reset_q, atol=2e-3)
    assert obs.images == {}  # render=False


def test_joint_and_gripper_commands_are_tracked(robot) -> None:
    target = np.asarray(robot.rig.reset_q, float).copy()
    target[0] += 0.1
    grippers = list(robot.profile.gripper_indices)
    target[grippers] = 0.03
    for _ in range(int(1.0 / robot.profile.dt)):
        robot.command(target)
    state = robot.state()
    assert abs(state[0] - target[0]) < 0.01
    assert np.allclose(state[grippers], 0.03, atol=3e-3)


def test_hold_keeps_the_arm_still(robot) -> None:
    before = robot.state().copy()
    for _ in range(10):
        robot.hold()
    assert np.allclose(robot.state(), before, atol=5e-3)


def test_bad_actions_are_refused(robot) -> None:
    with pytest.raises(ValueError, match="shape"):
        robot.command(np.zeros(3))
    bad = np.asarray(robot.rig.reset_q, float).copy()
    bad[1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        robot.command(bad)


def test_answer_card_on_zone_succeeds_and_wrong_card_does_not(robot) -> None:
    task = robot.task
    zx, zy = next(f for f in task.fixtures if f.kind == "zone").xy
    assert not robot.check_success().success
    wrong = next(n for n in task.card_numbers if n != task.answer)
    robot.set_object_pose(card_name(wrong), zx, zy)
    for _ in range(5):
        robot.hold()
    assert not robot.check_success().success
    robot.set_object_pose(card_name(wrong), zx, zy + 0.2 if zy < 0 else zy - 0.2)
    robot.set_object_pose(card_name(task.answer), zx + 0.01, zy - 0.01, yaw=0.3)
    for _ in range(5):  # it must stay there under physics, lying on the table
        robot.hold()
    result = robot.check_success()
    assert result.success, result.reason


@pytest.mark.parametrize("profile", PROFILES)
def test_toy_at_goal_succeeds_in_physics(profile: str, mujoco_module) -> None:
    from chatvla.client.sim.robot import make_sim_robot

    task = make_task("toy_placement", 4, "heldout")
    r = make_sim_robot(profile, task, render=False)
    assert not r.check_success().success
    r.set_object_pose(task.subject, *task.goal_xy())
    for _ in range(10):
        r.hold()
    result = r.check_success()
    assert result.success, result.reason
    r.close()


@pytest.mark.parametrize("profile", PROFILES)
def test_same_task_and_actions_give_identical_states(profile: str, mujoco_module) -> None:
    from chatvla.client.sim.robot import make_sim_robot

    p = get_profile(profile)
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(2):
        r = make_sim_robot(profile, make_task("toy_placement", 2), render=False)
        q = np.asarray(r.rig.reset_q, float)
        for _ in range(20):
            q = q + rng.uniform(-1, 1, p.action_dim) * np.asarray(p.max_step) * 0.5
            r.command(q)
        runs.append((r.state().copy(), {k: v.pos.copy() for k, v in r.object_poses().items()}))
        r.close()
        rng = np.random.default_rng(0)
    assert np.array_equal(runs[0][0], runs[1][0])
    assert all(np.array_equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_reset_with_a_new_task_rebuilds_the_scene(robot) -> None:
    robot.reset(make_task("toy_placement", 0))
    assert set(robot.object_poses()) == {o.name for o in robot.task.objects}
    assert np.allclose(robot.state(), robot.rig.reset_q, atol=2e-3)


def test_state_reads_within_the_joint_ranges_like_encoders(robot) -> None:
    """MuJoCo's joint limits are soft: a finger pressed against the table sits past its stop. The state
    reports what an encoder at the hard stop would, so a server never refuses it as out of the profile's
    range (which froze the arm mid-grasp in closed-loop evaluation)."""
    import mujoco

    m, d = robot.model, robot.data
    grippers = list(robot.profile.gripper_indices)
    adr = robot._state_qpos[grippers]
    joints = [int(np.flatnonzero(m.jnt_qposadr == a)[0]) for a in adr]
    d.qpos[adr] = m.jnt_range[joints, 0] - 0.01  # 1 cm past the closed stop
    mujoco.mj_forward(m, d)
    state = robot.state()
    assert np.all(state[grippers] >= 0.0)
    profile = robot.profile
    assert np.all(state >= np.asarray(profile.action_lower, np.float32) - 1e-6)
    d.qpos[adr] = m.jnt_range[joints, 1] + 0.1  # far past the open stop
    state = robot.state()
    assert np.all(state <= np.asarray(profile.action_upper, np.float32) + 1e-6)
