"""The franky adapter driving franky-sim (a MuJoCo FR3 speaking the libfranka protocol) on loopback.

This is the real SDK and the real network protocol end to end; only the arm is simulated. Everything
stays on 127.x.y.z, every wait has a deadline, and the server is shut down by its context managers.
Skipped when franky-control or franky-sim is not installed (they are in the dev environment).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from chatvla.client.robots.base import RobotError
from chatvla.client.robots.cameras import static_cameras
from chatvla.client.robots.franky import FrankyRobot
from chatvla.profiles import FRANKA_EE, FRANKA_JOINT

pytest.importorskip("franky", reason="franky-control not installed")
pytest.importorskip("franky_sim", reason="franky-sim not installed")
pytest.importorskip("mujoco", reason="mujoco not installed")

pytestmark = pytest.mark.timeout(120)

RATE = FRANKA_JOINT.control_rate_hz
# A loopback address nobody listens on (franky-sim binds the first free one from 127.0.0.1 up).
NOBODY = "127.0.0.213"


@pytest.fixture(scope="module")
def sim_host():
    from franky_sim import SimulationServer
    from franky_sim.mujoco_simulator import MujocoSimulator

    with MujocoSimulator(enable_visualization=False) as sim:
        model = sim.add_robot()
        with SimulationServer(sim) as server:
            server.run_async()
            host = model.hostname
            assert host.startswith("127."), host  # loopback only
            yield host


def _wait_for(pred, timeout: float, period: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(period)
    return pred()


def test_stream_joint_targets_then_hold_and_stop(sim_host):
    robot = FrankyRobot(sim_host, cameras=static_cameras(FRANKA_JOINT), realtime=False)
    with robot:
        start = robot.observe().state.astype(np.float64)
        assert np.isfinite(start).all()
        step = 0.5 * FRANKA_JOINT.max_step[0]
        target = start.copy()
        for _ in range(12):  # 12 ticks at the control rate, each a preempting async motion
            target[0] += step
            target[7] = 0.02
            robot.command(target)
            time.sleep(1.0 / RATE)
        robot.hold()
        assert _wait_for(lambda: abs(robot.observe().state[0] - target[0]) < 5e-3, timeout=5.0), (
            robot.observe().state[0],
            target[0],
        )
        # Other joints stayed where they were.
        np.testing.assert_allclose(robot.observe().state[1:7], start[1:7], atol=5e-3)
        assert robot._gripper is not None and robot._gripper.wait_idle(10.0)
        assert _wait_for(lambda: abs(robot.observe().state[7] - 0.02) < 5e-3, timeout=5.0)
        robot.stop()
        settled = robot.observe().state[0]
        time.sleep(0.3)
        assert abs(robot.observe().state[0] - settled) < 5e-3
    assert not robot.connected


def test_end_effector_profile_tracks_absolute_poses(sim_host):
    """rot6d -> Affine mapping against the real SDK: move down and forward, keep the orientation."""
    robot = FrankyRobot(sim_host, profile=FRANKA_EE, cameras=static_cameras(FRANKA_EE), realtime=False, gripper=False)
    with robot:
        start = robot.observe().state.astype(np.float64)
        target = start.copy()
        for _ in range(10):
            target[0] += 0.003
            target[2] -= 0.005
            robot.command(target)
            time.sleep(1.0 / RATE)
        assert _wait_for(lambda: np.abs(robot.observe().state[:3] - target[:3]).max() < 2e-3, timeout=5.0), (
            robot.observe().state[:3],
            target[:3],
        )
        np.testing.assert_allclose(robot.observe().state[3:9], start[3:9], atol=5e-3)
        robot.stop()


def test_nothing_listening_is_a_clear_error():
    robot = FrankyRobot(NOBODY, cameras=static_cameras(FRANKA_JOINT), realtime=False, gripper=False)
    with pytest.raises(RobotError, match="cannot connect to the FR3"):
        robot.connect()
