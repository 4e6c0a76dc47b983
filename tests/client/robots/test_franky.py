"""franky adapter against a fake franky: preempting async motions, hold/stop, errors, missing SDK."""

from __future__ import annotations

import numpy as np
import pytest

from chatvla.client.robots.base import RobotError
from chatvla.client.robots.franky import DEFAULT_DYNAMICS_FACTOR, FrankyRobot
from chatvla.profiles import FRANKA_EE, FRANKA_JOINT

HOME = np.array(FRANKA_JOINT.home)


def _robot(fakes, install, calls, cams, sdk_kw=None, **kw):
    sdk = fakes.franky(calls, **(sdk_kw or {}))
    install("franky", sdk)
    return FrankyRobot("172.16.0.2", cameras=cams, **kw), sdk


def _moves(calls):
    return [c[1] for c in calls.named("move")]


def test_connect_passes_realtime_and_dynamics(fakes, install, calls, franka_cams):
    robot, _ = _robot(fakes, install, calls, franka_cams, realtime=False)
    robot.connect()
    assert calls.named("Robot") == [("Robot", "172.16.0.2", "Ignore", DEFAULT_DYNAMICS_FACTOR)]
    assert not _moves(calls)  # connecting never moves the arm
    np.testing.assert_allclose(robot.observe().state, HOME, atol=1e-6)
    robot.close()


def test_command_is_an_async_preempting_joint_motion_that_keeps_its_target(fakes, install, calls, franka_cams):
    robot, _sdk = _robot(fakes, install, calls, franka_cams)
    robot.connect()
    for k in range(3):
        target = HOME.copy()
        target[0] += 0.01 * (k + 1)
        robot.command(target)
    moves = calls.named("move")
    assert len(moves) == 3 and all(asynchronous for (_, _, asynchronous) in moves)
    last = moves[-1][1]
    assert type(last).__name__ == "JointMotion"
    np.testing.assert_allclose(last.args[0].position, target[:7])
    assert last.kwargs["return_when_finished"] is False
    robot.hold()  # nothing new is sent: the last motion holds its target
    assert len(calls.named("move")) == 3
    robot.stop()
    assert type(_moves(calls)[-1]).__name__ == "JointStopMotion"
    robot.close()
    assert calls.named("join_motion")


def test_gripper_follows_newest_target_outside_the_deadband(fakes, install, calls, franka_cams):
    robot, _ = _robot(fakes, install, calls, franka_cams)
    robot.connect()
    a = HOME.copy()
    for w in (0.05, 0.0505, 0.051):  # within 2 mm of 0.05: only the first is sent
        a[7] = w
        robot.command(a)
        assert robot._gripper.wait_idle(2.0)
    assert [c[1] for c in calls.named("gripper.move")] == [pytest.approx(0.05)]
    assert robot.observe().state[7] == pytest.approx(0.05)
    robot.close()


def test_stop_before_any_command_sends_nothing(fakes, install, calls, franka_cams):
    robot, _ = _robot(fakes, install, calls, franka_cams, gripper=False)
    robot.connect()
    robot.stop()
    assert not _moves(calls)
    robot.close()


def test_motion_error_surfaces_on_observe(fakes, install, calls, franka_cams):
    robot, sdk = _robot(fakes, install, calls, franka_cams, gripper=False)
    robot.connect()
    robot.command(HOME)
    sdk._state["motion_error"] = "cartesian_reflex"
    with pytest.raises(RobotError, match="cartesian_reflex"):
        robot.observe()
    robot.close()


def test_error_state_refused_unless_recovery_asked(fakes, install, calls, franka_cams):
    robot, _ = _robot(fakes, install, calls, franka_cams, sdk_kw={"has_errors": True})
    with pytest.raises(RobotError, match="error state"):
        robot.connect()
    robot, _ = _robot(fakes, install, calls, franka_cams, sdk_kw={"has_errors": True}, recover_errors=True)
    robot.connect()
    assert calls.named("recover_from_errors")
    robot.close()


def test_realtime_failure_suggests_realtime_false(fakes, install, calls, franka_cams):
    robot, _ = _robot(
        fakes, install, calls, franka_cams, sdk_kw={"refuse": "libfranka: Running kernel does not have realtime"}
    )
    with pytest.raises(RobotError, match="realtime=False"):
        robot.connect()


def test_nan_state_refused(fakes, install, calls, franka_cams):
    q = HOME[:7].copy()
    q[3] = np.inf
    robot, _ = _robot(fakes, install, calls, franka_cams, sdk_kw={"q": q})
    with pytest.raises(RobotError, match="joint4"):
        robot.connect()
    assert not _moves(calls)


def test_missing_sdk_names_the_extra(install, franka_cams):
    install("franky", None)
    with pytest.raises(RobotError, match=r"chatvla-serve\[franky\]"):
        FrankyRobot("h", cameras=franka_cams).connect()


def test_ee_profile_streams_absolute_cartesian_motions(fakes, install, calls, franka_ee_cams):
    install("franky", fakes.franky(calls))
    robot = FrankyRobot("h", profile=FRANKA_EE, cameras=franka_ee_cams, gripper=False)
    robot.connect()
    state = robot.observe().state.astype(np.float64)
    np.testing.assert_allclose(state[:9], [0.4, 0, 0.5, 1, 0, 0, 0, -1, 0], atol=1e-6)
    target = state.copy()
    target[2] -= 0.01
    robot.command(target)
    motion = _moves(calls)[-1]
    assert type(motion).__name__ == "CartesianMotion"
    m = motion.args[0].pose.end_effector_pose.matrix
    np.testing.assert_allclose(m[:3, 3], [0.4, 0, 0.49], atol=1e-9)
    np.testing.assert_allclose(m[:3, :3], np.diag([1.0, -1.0, -1.0]), atol=1e-9)
    robot.stop()
    assert type(_moves(calls)[-1]).__name__ == "CartesianStopMotion"
    robot.close()


def test_degenerate_rotation_is_refused(fakes, install, calls, franka_ee_cams):
    sdk = fakes.franky(calls)
    install("franky", sdk)
    robot = FrankyRobot("h", profile=FRANKA_EE, cameras=franka_ee_cams, gripper=False)
    robot.connect()
    bad = np.array([0.4, 0, 0.5, 1, 0, 0, 1, 0, 0, 0.04])  # parallel rot6d columns
    with pytest.raises(RobotError, match="parallel"):
        robot.command(bad)
    assert not _moves(calls)
    robot.close()
