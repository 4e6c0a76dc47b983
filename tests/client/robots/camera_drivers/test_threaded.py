"""The grab thread every driver shares: newest frame at once, never a stale one, failures named."""

from __future__ import annotations

import numpy as np
import pytest

from chatvla.client.fakes import FakeClock
from chatvla.client.robots.base import RobotError
from chatvla.client.robots.camera_drivers.threaded import MIN_MAX_AGE_S, default_max_age_s
from chatvla.client.robots.cameras import Camera, CameraError, CameraStalled, capture
from chatvla.profiles import CameraSpec, RobotProfile


def started(kit, clock: FakeClock, **kwargs):
    cam = kit.ScriptedCamera(clock=clock.now, **kwargs)
    cam.queue.put(kit.solid(0))
    cam.start()
    return cam


def test_read_returns_the_newest_frame_read_only(kit):
    clock = FakeClock()
    cam = started(kit, clock, fps=10.0)
    try:
        assert isinstance(cam, Camera)
        for value in (1, 2, 3):
            cam.push(kit.solid(value))
        frame = cam.read()
        assert frame.dtype == np.uint8 and frame.shape == (4, 6, 3)
        assert (frame == 3).all() and cam.frames == 4
        assert cam.read() is frame  # no new exposure: the same frame, without waiting for one
        with pytest.raises(ValueError):
            frame[0, 0, 0] = 9  # shared with every reader until the next frame
    finally:
        cam.close()


def test_a_stalled_camera_raises_instead_of_returning_its_old_frame(kit):
    clock = FakeClock()
    cam = started(kit, clock, max_age_s=0.5)
    try:
        clock.advance(0.5)
        assert (cam.read() == 0).all()  # at the limit: still fresh
        clock.advance(0.25)
        kit.wait_for(lambda: cam._miss, what="a grab that gave no frame")
        with pytest.raises(CameraStalled) as err:
            cam.read()
        e = err.value
        assert isinstance(e, RobotError) and e.camera == "front"
        assert e.age_s == pytest.approx(0.75) and e.max_age_s == 0.5
        msg = str(e)
        assert "camera 'front' (scripted) stalled" in msg and "0.750 s old" in msg and "limit 0.500 s" in msg
        assert "nothing queued" in msg  # why the device gave no frame
        cam.push(kit.solid(7))  # the device recovers: fresh frames are served again
        assert (cam.read() == 7).all()
    finally:
        cam.close()


def test_the_default_limit_is_a_few_frame_periods_with_a_floor(kit):
    assert default_max_age_s(5.0) == pytest.approx(1.0)
    assert default_max_age_s(60.0) == MIN_MAX_AGE_S
    with pytest.raises(ValueError):
        default_max_age_s(0)
    assert kit.ScriptedCamera(fps=5.0).max_age_s == pytest.approx(1.0)
    assert kit.ScriptedCamera(fps=5.0, max_age_s=0.1).max_age_s == 0.1
    with pytest.raises(ValueError, match="max_age_s must be positive"):
        kit.ScriptedCamera(max_age_s=0)


def test_a_device_failure_is_reported_at_once_and_the_camera_released_on_close(kit):
    clock = FakeClock()
    cam = started(kit, clock)
    cam.queue.put(OSError("USB device disconnected"))
    kit.wait_for(lambda: cam._failure is not None, what="the failure to be recorded")
    with pytest.raises(CameraError, match=r"camera 'front' \(scripted\) failed: USB device disconnected") as err:
        cam.read()
    assert not isinstance(err.value, CameraStalled)
    cam.close()
    cam.close()
    assert cam.released == 1
    with pytest.raises(CameraError, match=r"closed|failed"):
        cam.read()


def test_reading_a_closed_camera_is_an_error(kit):
    cam = started(kit, FakeClock())
    cam.close()
    with pytest.raises(CameraError, match="is closed"):
        cam.read()
    with pytest.raises(CameraError, match="starts once"):
        cam.start()


def test_start_fails_clearly_when_no_frame_comes(kit):
    cam = kit.ScriptedCamera()
    with pytest.raises(CameraError, match=r"camera 'front' \(scripted\) gave no frame within 0.05 s.*nothing queued"):
        cam.start(first_frame_timeout_s=0.05)
    assert cam.released == 1
    broken = kit.ScriptedCamera()
    broken.queue.put(RuntimeError("bad format"))
    with pytest.raises(CameraError, match="failed at start: bad format"):
        broken.start()


def test_capture_keeps_the_stall_error_as_it_is(kit):
    clock = FakeClock()
    cam = started(kit, clock, max_age_s=0.2)
    profile = RobotProfile(
        name="one-cam", description="", action_space="joint_position", action_names=("j",), state_names=("j",),
        chunk_size=4, control_rate_hz=10.0, cameras=(CameraSpec("front", 4, 6),), action_lower=(-1.0,),
        action_upper=(1.0,), max_step=(0.1,),
    )
    try:
        assert (capture({"front": cam}, profile)["front"] == 0).all()
        clock.advance(1.0)
        with pytest.raises(CameraStalled, match="camera 'front'") as err:
            capture({"front": cam}, profile)
        assert "failed:" not in str(err.value)  # not re-wrapped into a generic "camera failed"
    finally:
        cam.close()
