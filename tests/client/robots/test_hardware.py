"""Shared adapter pieces: state plausibility, command check, gripper worker, cameras, pose maths."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from chatvla.client.robots.base import RobotError
from chatvla.client.robots.cameras import StaticCamera, bind_cameras, capture, static_cameras
from chatvla.client.robots.hardware import GripperWorker, check_command, require_sdk, validate_state
from chatvla.client.robots.poses import (
    ee_action_to_transform,
    matrix_to_quat_xyzw,
    quat_xyzw_to_matrix,
    rot6d_to_matrix,
    transform_to_ee_state,
)
from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_EE, FRANKA_JOINT


def test_validate_state_accepts_home_and_small_overshoot():
    home = np.array(FRANKA_JOINT.home)
    np.testing.assert_array_equal(validate_state(FRANKA_JOINT, home, source="t"), home)
    s = home.copy()
    s[5] = FRANKA_JOINT.action_lower[5] - 0.01  # encoder just past the end stop: plausible
    validate_state(FRANKA_JOINT, s, source="t")


def test_validate_state_names_the_bad_dimension():
    s = np.array(ARX_R5_BIMANUAL.home)
    s[9] = 9.0
    with pytest.raises(RobotError, match=r"right_joint3=9\.0000"):
        validate_state(ARX_R5_BIMANUAL, s, source="t")
    s[9] = np.nan
    with pytest.raises(RobotError, match="right_joint3"):
        validate_state(ARX_R5_BIMANUAL, s, source="t")


def test_validate_state_ee_checks_reach_and_rotation():
    good = np.array([0.4, 0, 0.5, 1, 0, 0, 0, -1, 0, 0.08])
    validate_state(FRANKA_EE, good, source="t")
    far = good.copy()
    far[0] = 5.0
    with pytest.raises(RobotError, match="reach"):
        validate_state(FRANKA_EE, far, source="t")
    zero_rot = good.copy()
    zero_rot[3:9] = 0
    with pytest.raises(RobotError, match="unit vectors"):
        validate_state(FRANKA_EE, zero_rot, source="t")


def test_check_command_tolerates_float_noise_only():
    a = np.array(FRANKA_JOINT.action_upper)
    check_command(FRANKA_JOINT, a + 1e-9)
    with pytest.raises(RobotError, match="gripper"):
        check_command(FRANKA_JOINT, a + np.r_[np.zeros(7), 0.01])


def test_require_sdk_message(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "some_arm_sdk", None)
    with pytest.raises(RobotError, match=r"pip install 'chatvla-serve\[arm\]'.*hint text"):
        require_sdk("some_arm_sdk", "arm", "Arm", hint="hint text")


def test_gripper_worker_newest_target_wins_and_errors_are_kept():
    started = threading.Event()
    release = threading.Event()
    sent: list[float] = []

    def move(w: float) -> None:
        sent.append(w)
        if len(sent) == 1:
            started.set()
            release.wait(5.0)  # a slow finger motion: targets pile up meanwhile
        if w < 0:
            raise RuntimeError("grasp failed")

    worker = GripperWorker(move, lambda: 0.05, name="t", deadband=0.001, poll_s=0.01)
    try:
        worker.set_target(0.01)
        assert started.wait(5.0)
        for w in (0.02, 0.03, 0.04):  # only the newest survives the busy period
            worker.set_target(w)
        release.set()
        assert worker.wait_idle(5.0)
        assert sent == [0.01, 0.04]
        worker.set_target(-0.5)
        assert worker.wait_idle(5.0)
        assert isinstance(worker.error, RuntimeError)
        assert worker.width == 0.05
    finally:
        release.set()
        worker.close()


def test_cameras_bind_and_capture_checks():
    cams = static_cameras(FRANKA_JOINT)
    bound = bind_cameras(FRANKA_JOINT, cams)
    assert list(bound) == ["front", "wrist"]
    imgs = capture(bound, FRANKA_JOINT)
    assert imgs["front"].shape == (224, 224, 3) and imgs["front"].dtype == np.uint8
    with pytest.raises(RobotError, match=r"no cameras named \['top'\]"):
        bind_cameras(FRANKA_JOINT, {**cams, "top": StaticCamera()})

    class Grey:
        def read(self):
            return np.zeros((4, 4), np.uint8)

        def close(self):
            pass

    with pytest.raises(RobotError, match=r"camera 'wrist' returned uint8 \[4, 4\]"):
        capture({"front": cams["front"], "wrist": Grey()}, FRANKA_JOINT)
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(StaticCamera.from_image(img).read(), img)


def test_pose_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=4)
        r = quat_xyzw_to_matrix(q)
        q2 = matrix_to_quat_xyzw(r)
        np.testing.assert_allclose(quat_xyzw_to_matrix(q2), r, atol=1e-9)
        t = np.eye(4)
        t[:3, :3] = r
        t[:3, 3] = rng.normal(size=3)
        state = transform_to_ee_state(t, 0.03)
        np.testing.assert_allclose(ee_action_to_transform(state), t, atol=1e-9)
    # A sloppy predicted rot6d is re-orthonormalised, not passed through.
    r = rot6d_to_matrix(np.array([1.0, 0.1, 0, 0.05, 1.0, 0]))
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-12)
