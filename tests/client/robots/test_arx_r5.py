"""ARX R5 adapter: missing/down CAN and the all-zero state are refused; per-arm command mapping."""

from __future__ import annotations

import numpy as np
import pytest

from chatvla.client.robots.arx_r5 import DEFAULT_GRIPPER_SDK_MAX, ArxR5Robot, check_can_interface
from chatvla.client.robots.base import RobotError
from chatvla.profiles import ARX_R5_BIMANUAL

LEFT = [0.1, -0.2, 0.3, 0.05, -0.05, 0.2, 2.5]  # 6 joints + gripper in SDK units
RIGHT = [-0.1, 0.2, -0.3, -0.05, 0.05, -0.2, 5.0]
SCALE = DEFAULT_GRIPPER_SDK_MAX / ARX_R5_BIMANUAL.action_upper[6]


def _setup(fakes, install, calls, tmp_path, *, ifaces=None, left=LEFT, right=RIGHT):
    joints = {"can0": list(left), "can1": list(right)}
    install("arx_r5_sdk", fakes.arx(calls, joints))
    net = fakes.sysfs(tmp_path, ifaces if ifaces is not None else {"can0": True, "can1": True, "lo": True})
    return joints, net


def _robot(net, cams):
    return ArxR5Robot("can0", "can1", cameras=cams, sysfs_net=str(net), sleep=lambda s: None)


def test_connect_and_observe_both_arms(fakes, install, calls, tmp_path, arx_cams):
    _, net = _setup(fakes, install, calls, tmp_path)
    robot = _robot(net, arx_cams)
    robot.connect()
    ports = [c[1]["can_port"] for c in calls.named("SingleArm")]
    assert ports == ["can0", "can1"]
    state = robot.observe().state
    np.testing.assert_allclose(state[:6], LEFT[:6], atol=1e-6)
    assert state[6] == pytest.approx(LEFT[6] / SCALE, rel=1e-5)
    np.testing.assert_allclose(state[7:13], RIGHT[:6], atol=1e-6)
    assert state[13] == pytest.approx(ARX_R5_BIMANUAL.action_upper[13], rel=1e-5)
    assert set(robot.observe().images) == set(ARX_R5_BIMANUAL.camera_names)
    robot.close()


def test_command_maps_joints_and_catch_per_arm(fakes, install, calls, tmp_path, arx_cams):
    _, net = _setup(fakes, install, calls, tmp_path)
    robot = _robot(net, arx_cams)
    robot.connect()
    action = np.array([*LEFT[:6], 0.044, *RIGHT[:6], 0.0])
    robot.command(action)
    sets = calls.named("set_joint_positions")
    assert [s[1] for s in sets] == ["can0", "can1"]
    np.testing.assert_allclose(sets[0][2], LEFT[:6])
    np.testing.assert_allclose(sets[1][2], RIGHT[:6])
    assert [(c[1], pytest.approx(c[2])) for c in calls.named("set_catch_pos")] == [
        ("can0", pytest.approx(0.044 * SCALE)),
        ("can1", pytest.approx(0.0)),
    ]
    robot.hold()  # the SDK keeps tracking the last target
    assert len(calls.named("set_joint_positions")) == 2
    robot.close()


def test_stop_freezes_at_measured_joints(fakes, install, calls, tmp_path, arx_cams):
    joints, net = _setup(fakes, install, calls, tmp_path)
    robot = _robot(net, arx_cams)
    robot.connect()
    robot.command(np.array([*LEFT[:6], 0.04, *RIGHT[:6], 0.04]))
    joints["can0"][0] = 0.15
    robot.stop()
    left_stop = [s for s in calls.named("set_joint_positions") if s[1] == "can0"][-1]
    np.testing.assert_allclose(left_stop[2], [0.15, *LEFT[1:6]])
    robot.close()


def test_missing_can_interface_fails_before_the_sdk_is_touched(fakes, install, calls, tmp_path, arx_cams):
    _, net = _setup(fakes, install, calls, tmp_path, ifaces={"can0": True, "lo": True})
    robot = _robot(net, arx_cams)
    with pytest.raises(RobotError, match=r"'can1' not found.*can0"):
        robot.connect()
    assert not calls.named("SingleArm")


def test_down_can_interface_says_how_to_bring_it_up(fakes, install, calls, tmp_path, arx_cams):
    _, net = _setup(fakes, install, calls, tmp_path, ifaces={"can0": True, "can1": False})
    with pytest.raises(RobotError, match="ip link set can1 up"):
        _robot(net, arx_cams).connect()
    assert not calls.named("SingleArm")


def test_real_sysfs_without_can_is_detected(arx_cams):
    with pytest.raises(RobotError, match="not found"):
        check_can_interface("can-does-not-exist-7")


def test_all_zero_state_is_refused_and_nothing_is_commanded(fakes, install, calls, tmp_path, arx_cams):
    _, net = _setup(fakes, install, calls, tmp_path, right=[0.0] * 7)
    robot = _robot(net, arx_cams)
    with pytest.raises(RobotError, match=r"right \(can1\).*all-zero.*Refusing to drive on zeros"):
        robot.connect()
    assert not calls.named("set_joint_positions")
    assert not robot.connected


def test_bus_dropping_to_zeros_mid_run_stops_observe(fakes, install, calls, tmp_path, arx_cams):
    joints, net = _setup(fakes, install, calls, tmp_path)
    robot = _robot(net, arx_cams)
    robot.connect()
    joints["can0"][:] = [0.0] * 7
    with pytest.raises(RobotError, match="left arm on can0 now reports an all-zero"):
        robot.observe()


def test_interface_vanishing_mid_run_stops_observe(fakes, install, calls, tmp_path, arx_cams):
    _, net = _setup(fakes, install, calls, tmp_path)
    robot = _robot(net, arx_cams)
    robot.connect()
    (net / "can1" / "flags").write_text("0x1002\n")
    with pytest.raises(RobotError, match="can1' is down"):
        robot.observe()


def test_missing_sdk_names_extra_and_library_path(install, tmp_path, fakes, arx_cams):
    install("arx_r5_sdk", None)
    net = fakes.sysfs(tmp_path, {"can0": True, "can1": True})
    with pytest.raises(RobotError, match=r"chatvla-serve\[arx\].*LD_LIBRARY_PATH"):
        _robot(net, arx_cams).connect()


def test_same_port_for_both_arms_is_refused(arx_cams):
    with pytest.raises(RobotError, match="own CAN interface"):
        ArxR5Robot("can0", "can0", cameras=arx_cams)
