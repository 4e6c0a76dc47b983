"""The OpenCV driver on a video file written here (distinct colours per frame), and on a scripted
capture for what a file cannot show (device settings, a failing read, grey frames)."""

from __future__ import annotations

import logging
import sys
import threading

import numpy as np
import pytest

from chatvla.client.fakes import FakeClock
from chatvla.client.robots.base import RobotError
from chatvla.client.robots.camera_drivers.opencv import OpenCVCamera
from chatvla.client.robots.cameras import CameraError, CameraStalled

# RGB colours of the video's frames, in order; OpenCV writes BGR, so the file holds them reversed.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
HEIGHT, WIDTH = 24, 32


@pytest.fixture
def cv2():
    return pytest.importorskip("cv2")


@pytest.fixture
def video(cv2, tmp_path):
    path = tmp_path / "colours.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for rgb in COLOURS:
        writer.write(np.full((HEIGHT, WIDTH, 3), rgb[::-1], dtype=np.uint8))
    writer.release()
    return path


def close_to(frame: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    """MJPG is lossy: a flat colour comes back within a few levels."""
    return bool(np.abs(frame.astype(int) - np.asarray(rgb)).max() <= 12)


def test_a_video_file_plays_as_rgb_and_read_returns_the_latest_frame(kit, video):
    clock = FakeClock()
    cam = OpenCVCamera(str(video), name="front", fps=500.0, max_age_s=0.5, clock=clock.now).start()
    try:
        assert cam.is_file and cam.describe() == f"opencv:{video}"
        kit.wait_for(lambda: cam.frames == len(COLOURS), what="the whole file")
        frame = cam.read()
        assert frame.dtype == np.uint8 and frame.shape == (HEIGHT, WIDTH, 3)
        assert close_to(frame, COLOURS[-1]), frame[0, 0]  # RGB, not the file's BGR
        assert not frame.flags.writeable
    finally:
        cam.close()


def test_a_file_without_a_requested_rate_plays_at_its_own(video):
    cam = OpenCVCamera(str(video), name="front").start()
    try:
        assert cam.fps == pytest.approx(10.0)
        assert cam.max_age_s == pytest.approx(0.5)  # 5 frame periods of 10 fps
        assert any(close_to(cam.read(), rgb) for rgb in COLOURS)
    finally:
        cam.close()


def test_a_file_that_ends_stalls_after_the_limit_and_names_the_camera(kit, video):
    clock = FakeClock()
    cam = OpenCVCamera(str(video), name="wrist", fps=500.0, max_age_s=0.5, clock=clock.now).start()
    try:
        kit.wait_for(lambda: cam.frames == len(COLOURS), what="the whole file")
        kit.wait_for(lambda: cam._miss, what="the end of the file")
        clock.advance(0.4)
        assert close_to(cam.read(), COLOURS[-1])  # the last frame is still young enough
        clock.advance(0.2)
        with pytest.raises(CameraStalled) as err:
            cam.read()
        msg = str(err.value)
        assert msg.startswith(f"camera 'wrist' (opencv:{video}) stalled: newest frame is 0.600 s old, limit 0.500 s")
        assert "end of the video file" in msg
    finally:
        cam.close()


def test_a_missing_path_is_one_clear_error(tmp_path, cv2):
    with pytest.raises(CameraError, match=r"camera 'front' \(opencv:.*nope.avi\): no such device or file"):
        OpenCVCamera(str(tmp_path / "nope.avi"), name="front").start()


class ScriptedCapture:
    """Stands in for cv2.VideoCapture on a device: records settings, serves `frames`, then gives no
    frame until `broken` is set, and from then on raises `fail`."""

    def __init__(self, frames: list[np.ndarray], *, fps: float = 30.0, fail: BaseException | None = None) -> None:
        self.frames = list(frames)
        self.fail = fail
        self.broken = threading.Event()
        self.props: dict[int, float] = {}
        self.fps = fps
        self.released = False

    def isOpened(self) -> bool:
        return True

    def set(self, prop: int, value: float) -> bool:
        self.props[prop] = value
        return True

    def get(self, prop: int) -> float:
        import cv2

        return self.fps if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self):
        if self.frames:
            return True, self.frames.pop(0)
        if self.fail is not None and self.broken.is_set():
            raise self.fail
        return False, None

    def release(self) -> None:
        self.released = True


def test_a_device_is_asked_for_its_size_and_rate_and_grey_frames_become_rgb(kit, cv2, caplog):
    grey = np.full((48, 64), 200, dtype=np.uint8)
    cap = ScriptedCapture([grey], fps=15.0, fail=OSError("select() timeout, device unplugged"))
    with caplog.at_level(logging.WARNING):
        cam = OpenCVCamera(2, name="wrist", width=640, height=480, fps=30.0, open_capture=lambda src: cap).start()
    try:
        assert cap.props[cv2.CAP_PROP_FRAME_WIDTH] == 640 and cap.props[cv2.CAP_PROP_FRAME_HEIGHT] == 480
        assert cap.props[cv2.CAP_PROP_FPS] == 30.0 and cap.props[cv2.CAP_PROP_BUFFERSIZE] == 1
        assert "asked for 30 fps, the device reports 15" in caplog.text
        assert "delivers 64x48, asked for 640x480" in caplog.text
        frame = cam.read()
        assert frame.shape == (48, 64, 3) and (frame == 200).all()
        cap.broken.set()
        # The device then fails: reported at once as a failure of this camera, not as a stall later.
        kit.wait_for(lambda: cam._failure is not None, what="the failure")
        with pytest.raises(CameraError, match=r"camera 'wrist' \(opencv:2\) failed: select\(\) timeout"):
            cam.read()
    finally:
        cam.close()
    assert cap.released


def test_frames_are_rgb_whatever_the_device_gives(cv2):
    from chatvla.client.robots.camera_drivers.opencv import to_rgb

    bgr = np.zeros((2, 3, 3), dtype=np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    assert to_rgb(cv2, bgr)[0, 0].tolist() == [0, 0, 255]
    bgra = np.zeros((2, 3, 4), dtype=np.uint8)
    bgra[..., 2] = 255  # red
    assert to_rgb(cv2, bgra)[0, 0].tolist() == [255, 0, 0]
    assert to_rgb(cv2, np.full((2, 3, 1), 9, dtype=np.uint8)).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="8-bit"):
        to_rgb(cv2, np.zeros((2, 3, 3), dtype=np.uint16))


def test_a_device_that_does_not_open_is_one_clear_error(cv2):
    class Closed(ScriptedCapture):
        def isOpened(self) -> bool:
            return False

    cap = Closed([])
    with pytest.raises(CameraError, match=r"camera 'front' \(opencv:7\): OpenCV could not open it: check the index"):
        OpenCVCamera(7, name="front", open_capture=lambda src: cap).start()
    assert cap.released


def test_without_opencv_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(RobotError) as err:
        OpenCVCamera(0, name="front").start()
    assert str(err.value).startswith("camera 'front' (opencv:0) needs the 'cv2' module")
    assert "pip install 'chatvla-serve[camera]'" in str(err.value) and "\n" not in str(err.value)


def test_bad_sizes_are_refused_before_opening():
    with pytest.raises(ValueError, match="both width and height"):
        OpenCVCamera(0, name="front", width=640)
    with pytest.raises(ValueError, match="fps must be positive"):
        OpenCVCamera(0, name="front", fps=0)
