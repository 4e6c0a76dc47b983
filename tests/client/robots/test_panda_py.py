"""panda_py adapter against a fake panda-python: command mapping, hold/stop, refusal of bad state."""

from __future__ import annotations

import numpy as np
import pytest

from chatvla.client.robots.base import RobotError
from chatvla.client.robots.panda_py import DEFAULT_FILTER_COEFF, PandaPyRobot
from chatvla.profiles import FRANKA_EE, FRANKA_JOINT

HOME = np.array(FRANKA_JOINT.home)


def _robot(fakes, install, calls, cams, **kw):
    sdk = fakes.panda_py(calls, **kw)
    install("panda_py", sdk)
    return PandaPyRobot("10.0.0.2", cameras=cams), sdk


def test_connect_validates_then_starts_joint_controller(fakes, install, calls, franka_cams):
    robot, _ = _robot(fakes, install, calls, franka_cams)
    robot.connect()
    names = [c[0] for c in calls.log]
    assert names[:3] == ["Panda", "Gripper", "JointPosition"]
    assert calls.named("JointPosition")[0][1] == DEFAULT_FILTER_COEFF
    assert calls.named("start_controller") == [("start_controller", "JointPosition")]
    obs = robot.observe()
    assert obs.state.dtype == np.float32 and obs.state.shape == (8,)
    np.testing.assert_allclose(obs.state, HOME, atol=1e-6)
    assert set(obs.images) == {"front", "wrist"}
    robot.close()


def test_command_maps_joints_velocity_feedforward_and_gripper(fakes, install, calls, franka_cams):
    robot, _ = _robot(fakes, install, calls, franka_cams)
    robot.connect()
    target = HOME.copy()
    target[0] += 0.05
    target[7] = 0.04
    robot.command(target)
    (_, q, dq) = calls.named("set_control")[-1]
    np.testing.assert_allclose(q, target[:7])
    expected_dq = np.zeros(7)
    expected_dq[0] = 0.05 * FRANKA_JOINT.control_rate_hz
    np.testing.assert_allclose(dq, expected_dq)
    assert robot._gripper.wait_idle(2.0)
    assert calls.named("gripper.move")[-1][1] == pytest.approx(0.04)
    # Closing below the grasp threshold grasps with force instead of moving to a width.
    target[7] = 0.0
    robot.command(target)
    assert robot._gripper.wait_idle(2.0)
    assert calls.named("gripper.grasp"), calls.log
    robot.close()


def test_hold_zeroes_velocity_and_stop_retargets_measured_pose(fakes, install, calls, franka_cams):
    robot, sdk = _robot(fakes, install, calls, franka_cams)
    robot.connect()
    target = HOME.copy()
    target[1] += 0.03
    robot.command(target)
    robot.hold()
    (_, q, dq) = calls.named("set_control")[-1]
    np.testing.assert_allclose(q, target[:7])
    np.testing.assert_array_equal(dq, np.zeros(7))
    sdk._state["q"] = HOME[:7] + 0.01
    robot.stop()
    (_, q, dq) = calls.named("set_control")[-1]
    np.testing.assert_allclose(q, HOME[:7] + 0.01)
    np.testing.assert_array_equal(dq, np.zeros(7))
    robot.close()
    assert calls.named("stop_controller")
    robot.close()  # twice is fine


@pytest.mark.parametrize(
    "q, words",
    [
        (np.full(7, np.nan), "not finite"),
        (np.array([0.0, 0.0, 0.0, 5.0, 0.0, 1.0, 0.0]), "joint4"),
        (np.zeros(6), "returned 6 joint values"),
    ],
)
def test_refuses_garbage_state_before_any_controller(fakes, install, calls, franka_cams, q, words):
    robot, _ = _robot(fakes, install, calls, franka_cams, q=q)
    with pytest.raises(RobotError, match=words):
        robot.connect()
    assert not calls.named("start_controller")
    assert not robot.connected
    with pytest.raises(RobotError, match="not connected"):
        robot.command(HOME)


def test_command_refuses_nonfinite_and_out_of_limits(fakes, install, calls, franka_cams):
    robot, _ = _robot(fakes, install, calls, franka_cams)
    robot.connect()
    n = len(calls.named("set_control"))
    bad = HOME.copy()
    bad[2] = np.nan
    with pytest.raises(RobotError, match="not finite"):
        robot.command(bad)
    bad = HOME.copy()
    bad[0] = 3.5
    with pytest.raises(RobotError, match="joint1"):
        robot.command(bad)
    with pytest.raises(RobotError, match="7 values"):
        robot.command(HOME[:7])
    assert len(calls.named("set_control")) == n
    robot.close()


def test_controller_error_surfaces_on_observe(fakes, install, calls, franka_cams):
    robot, sdk = _robot(fakes, install, calls, franka_cams)
    robot.connect()
    sdk._state["error"] = "communication_constraints_violation"
    with pytest.raises(RobotError, match="communication_constraints_violation"):
        robot.observe()
    robot.close()


def test_missing_sdk_names_the_extra(install, franka_cams):
    install("panda_py", None)  # makes `import panda_py` raise ImportError
    robot = PandaPyRobot("10.0.0.2", cameras=franka_cams)
    with pytest.raises(RobotError, match=r"chatvla-serve\[panda\]"):
        robot.connect()


def test_connection_refused_is_a_clear_robot_error(fakes, install, calls, franka_cams):
    robot, _ = _robot(fakes, install, calls, franka_cams, refuse=True)
    with pytest.raises(RobotError, match="FCI is enabled"):
        robot.connect()


def test_missing_camera_and_wrong_profile_fail_at_construction(franka_cams):
    with pytest.raises(RobotError, match="no source for"):
        PandaPyRobot("h", cameras={"front": franka_cams["front"]})
    from chatvla.profiles import ARX_R5_BIMANUAL

    with pytest.raises(RobotError, match="does not fit a Franka arm"):
        PandaPyRobot("h", profile=ARX_R5_BIMANUAL, cameras=franka_cams)


def test_ee_profile_uses_cartesian_impedance_with_xyzw_quaternion(fakes, install, calls, franka_ee_cams):
    sdk = fakes.panda_py(calls)
    install("panda_py", sdk)
    robot = PandaPyRobot("h", profile=FRANKA_EE, cameras=franka_ee_cams, gripper=False)
    robot.connect()
    assert calls.named("start_controller") == [("start_controller", "CartesianImpedance")]
    state = robot.observe().state
    # Gripper down: rotation diag(1, -1, -1) -> rot6d columns (1,0,0), (0,-1,0); no hand -> fully open.
    np.testing.assert_allclose(state, [0.4, 0, 0.5, 1, 0, 0, 0, -1, 0, 0.08], atol=1e-6)
    robot.command(state.astype(np.float64))
    (_, pos, quat) = calls.named("set_control_ee")[-1]
    np.testing.assert_allclose(pos, [0.4, 0, 0.5], atol=1e-6)
    assert abs(abs(quat[0]) - 1.0) < 1e-6  # 180 deg about x
    robot.close()
