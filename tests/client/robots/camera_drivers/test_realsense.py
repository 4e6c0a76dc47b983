"""The RealSense driver against a fake `pyrealsense2` (no device here): the colour stream it asks for,
the frames it hands out, and how a missing device, an unsupported mode and a stall are reported."""

from __future__ import annotations

import sys
import threading
import types
from enum import Enum

import numpy as np
import pytest

from chatvla.client.fakes import FakeClock
from chatvla.client.robots.base import RobotError
from chatvla.client.robots.camera_drivers.realsense import RealSenseCamera
from chatvla.client.robots.cameras import CameraError, CameraStalled


class Stream(Enum):
    color = "color"
    depth = "depth"


class Format(Enum):
    rgb8 = "rgb8"
    bgr8 = "bgr8"


class CameraInfo(Enum):
    serial_number = "serial_number"


class FakeRealSense:
    """The slice of pyrealsense2 the driver uses. `frames` are served in order; after them each wait
    times out (as librealsense does when the camera is unplugged) with its RuntimeError."""

    def __init__(self, serials: tuple[str, ...] = ("111", "222")) -> None:
        self.serials = serials
        self.frames: list[np.ndarray] = []
        self.served = threading.Event()
        self.configs: list[FakeConfig] = []
        self.pipelines: list[FakePipeline] = []
        self.start_error: str | None = None

    def module(self) -> types.ModuleType:
        rs = types.ModuleType("pyrealsense2")
        rs.stream, rs.format, rs.camera_info = Stream, Format, CameraInfo
        fake = self

        class Device:
            def __init__(self, serial: str) -> None:
                self._serial = serial

            def get_info(self, what: CameraInfo) -> str:
                assert what is CameraInfo.serial_number
                return self._serial

        class Context:
            def query_devices(self) -> list[Device]:
                return [Device(s) for s in fake.serials]

        def config() -> FakeConfig:
            fake.configs.append(FakeConfig())
            return fake.configs[-1]

        def pipeline() -> FakePipeline:
            fake.pipelines.append(FakePipeline(fake))
            return fake.pipelines[-1]

        rs.context, rs.config, rs.pipeline = Context, config, pipeline
        return rs


class FakeConfig:
    def __init__(self) -> None:
        self.device: str | None = None
        self.streams: list[tuple] = []

    def enable_device(self, serial: str) -> None:
        self.device = serial

    def enable_stream(self, stream: Stream, width: int, height: int, fmt: Format, fps: int) -> None:
        self.streams.append((stream, width, height, fmt, fps))


class ColourFrame:
    def __init__(self, data: np.ndarray) -> None:
        self._data = data

    def __bool__(self) -> bool:
        return True

    def get_data(self) -> memoryview:
        return memoryview(self._data)


class FrameSet:
    def __init__(self, data: np.ndarray) -> None:
        self._colour = ColourFrame(data)

    def get_color_frame(self) -> ColourFrame:
        return self._colour


class FakePipeline:
    def __init__(self, fake: FakeRealSense) -> None:
        self.fake = fake
        self.started = False
        self.stopped = False
        self.timeouts: list[int] = []

    def start(self, config: FakeConfig) -> None:
        if self.fake.start_error:
            raise RuntimeError(self.fake.start_error)
        self.started = True

    def wait_for_frames(self, timeout_ms: int = 5000) -> FrameSet:
        self.timeouts.append(timeout_ms)
        if self.fake.frames:
            return FrameSet(self.fake.frames.pop(0))
        self.fake.served.set()
        threading.Event().wait(0.005)  # a real wait blocks for timeout_ms; the test need not
        raise RuntimeError(f"Frame didn't arrive within {timeout_ms}")

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def rs(monkeypatch) -> FakeRealSense:
    fake = FakeRealSense()
    monkeypatch.setitem(sys.modules, "pyrealsense2", fake.module())
    return fake


def frame(value: int, height: int = 240, width: int = 424) -> np.ndarray:
    out = np.zeros((height, width, 3), dtype=np.uint8)
    out[..., 0] = value  # red channel carries the frame number
    return out


def test_the_colour_stream_is_asked_for_at_the_requested_mode_and_frames_come_out_rgb(rs, kit):
    rs.frames = [frame(1), frame(2), frame(3)]
    cam = RealSenseCamera("222", name="cam_top", width=424, height=240, fps=15, frame_timeout_ms=50).start()
    try:
        (config,) = rs.configs
        assert config.device == "222"
        assert config.streams == [(Stream.color, 424, 240, Format.rgb8, 15)]
        kit.wait_for(rs.served.is_set, what="all frames")
        img = cam.read()
        assert img.dtype == np.uint8 and img.shape == (240, 424, 3)
        assert img[0, 0].tolist() == [3, 0, 0]  # the latest, channels untouched (rgb8 is RGB)
        assert not img.flags.writeable and img.base is None  # a copy, not librealsense's reused buffer
        assert rs.pipelines[0].timeouts[0] == 50
        assert cam.max_age_s == pytest.approx(5 / 15)
    finally:
        cam.close()
    assert rs.pipelines[0].stopped


def test_defaults_are_the_mode_every_realsense_has(rs):
    rs.frames = [frame(1, 480, 640)]
    cam = RealSenseCamera(name="cam_top").start()
    try:
        assert rs.configs[0].device is None  # the only camera attached
        assert rs.configs[0].streams == [(Stream.color, 640, 480, Format.rgb8, 30)]
        assert cam.describe() == "realsense"
    finally:
        cam.close()


def test_a_stalled_realsense_is_reported_with_librealsense_s_reason(rs, kit):
    clock = FakeClock()
    rs.frames = [frame(1)]
    cam = RealSenseCamera("111", name="wrist", width=424, height=240, fps=30, clock=clock.now,
                          frame_timeout_ms=5).start()
    try:
        kit.wait_for(rs.served.is_set, what="the frames to run out")
        kit.wait_for(lambda: cam._miss, what="a timed-out wait")
        clock.advance(0.3)
        with pytest.raises(CameraStalled) as err:
            cam.read()
        msg = str(err.value)
        assert msg.startswith("camera 'wrist' (realsense:111) stalled: newest frame is 0.300 s old, limit 0.250 s")
        assert "Frame didn't arrive within 5" in msg
    finally:
        cam.close()


def test_a_serial_that_is_not_connected_lists_the_ones_that_are(rs):
    expected = r"camera 'wrist': no RealSense with serial 999 is connected \(connected: 111, 222\)"
    with pytest.raises(CameraError, match=expected):
        RealSenseCamera("999", name="wrist").start()
    assert rs.pipelines == []


def test_an_unsupported_mode_names_it(rs):
    rs.start_error = "Couldn't resolve requests"
    expected = r"could not start the colour stream at 1000x10@30 \(rgb8\): Couldn't resolve"
    with pytest.raises(CameraError, match=expected):
        RealSenseCamera("111", name="wrist", width=1000, height=10).start()


def test_a_frame_of_the_wrong_shape_ends_the_camera(rs):
    rs.frames = [frame(2, 10, 10)]
    expected = r"failed at start: colour frame is uint8 \[10, 10, 3\], asked for 424x240@30"
    with pytest.raises(CameraError, match=expected):
        RealSenseCamera(name="wrist", width=424, height=240).start()
    assert rs.pipelines[0].stopped


def test_without_pyrealsense2_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyrealsense2", None)
    with pytest.raises(RobotError) as err:
        RealSenseCamera("111", name="wrist").start()
    assert str(err.value).startswith("camera 'wrist' (realsense:111) needs the 'pyrealsense2' module")
    assert "pip install 'chatvla-serve[realsense]'" in str(err.value)


def test_a_fractional_rate_is_refused():
    with pytest.raises(ValueError, match="whole frame rates"):
        RealSenseCamera(name="wrist", fps=7.5)  # type: ignore[arg-type]
